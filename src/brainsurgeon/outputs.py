"""Outputs that never touch what the user has: checked before the work, staged, then renamed.

Every command that writes follows the same rules:

* an existing output is refused unless ``--force`` (a directory only when it is non-empty);
* an output never replaces an input, nor a directory output one that holds an input;
* the location is probed for writability before any long work (one temporary directory created
  and removed beside the target), so a read-only or missing parent fails in a second, not after
  an hour of pruning;
* a directory output is written whole into a temporary directory beside the target and renamed
  into place (into an existing one, with ``--force``, file by file: the user's other files stay);
  a failed write removes that temporary directory, so nothing blocks the retry;
* a file system error (read-only, disk full, no permission) becomes a one-line
  :class:`~brainsurgeon.errors.BrainsurgeonError`, which the CLI prints and exits 2 on.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import BrainsurgeonError

#: errors of the file system rather than of the program: reported in one line, never a traceback
WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOENT,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def default_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the current umask (0644 / 0755 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_error(e: OSError, target: Path, flag: str = "--out") -> BrainsurgeonError:
    """A one-line error for a failed write (``flag`` names the option or key that chose ``target``)."""
    reason = e.strerror or str(e)
    space = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    hint = "free some space, or give " if space else "give "
    return BrainsurgeonError(f"cannot write {target}: {reason} (errno {e.errno}); {hint}another {flag}")


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _nearest_existing(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(target: Path, flag: str = "--out") -> None:
    """Create and remove a temporary directory where ``target`` will go (its nearest existing parent)."""
    parent = _nearest_existing(target)
    if not parent.is_dir():
        raise BrainsurgeonError(f"{flag} {target}: {parent} is not a directory; choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".probe", dir=parent))
    except OSError as e:
        raise write_error(e, target, flag) from e


def check_output(out: Path, *, force: bool, inputs: Iterable[Path] = (), outputs: Iterable[str] | None = None,
                 flag: str = "--out", allow_existing: bool = False) -> None:
    """Refuse an output that exists (unless ``force``) or that would replace an input; probe writability.

    ``outputs``: the names written inside the directory ``out`` (None: ``out`` is a file).
    ``allow_existing``: the output may exist (``--resume`` of the same run)."""
    out = Path(out)
    directory = outputs is not None
    inputs = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    written = [out / name for name in outputs] if directory else [out]
    for p in inputs:
        for w in written:
            if w.resolve() == p.resolve() or _inside(p, w):
                raise BrainsurgeonError(
                    f"{flag} {out} would overwrite the input {p}" + (f" with {w.name}" if directory else "")
                    + "; choose another " + ("directory" if directory else "file")
                )
    if out.exists():
        if directory and not out.is_dir():
            raise BrainsurgeonError(f"{flag} {out} is a file; it must be a directory (it will be created)")
        if not directory and out.is_dir():
            raise BrainsurgeonError(f"{flag} {out} is a directory; {flag} must name a file")
        non_empty = not directory or any(out.iterdir())
        if non_empty and not (force or allow_existing):
            kind = "exists and is not empty" if directory else "exists"
            raise BrainsurgeonError(f"{flag} {out} {kind}; pass --force to overwrite it")
    probe_writable(out, flag)


@contextmanager
def staged_dir(out: Path, flag: str = "--out", keep_on_error: bool = False, staging: Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` (an existing one is
    merged into, see :func:`_replace_dir`). On failure the temporary directory is removed
    (``keep_on_error``: kept if it holds a file, for a run that can be resumed from it); an ``OSError``
    of the file system becomes one line.

    ``staging``: use this directory (created if missing) instead of a fresh temporary one."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if staging is None:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        else:
            tmp = staging
            tmp.mkdir(exist_ok=True)
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700; the result should look like mkdir's
    except OSError as e:
        raise write_error(e, out, flag) from e
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException as e:
        if not keep_on_error or not any(p.is_file() for p in tmp.rglob("*")):
            shutil.rmtree(tmp, ignore_errors=True)  # nothing to resume from: nothing left behind
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise write_error(e, out, flag) from e
        raise


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``. Into an existing non-empty ``out`` (``--force``) each entry is renamed
    over its namesake, so the user's other files there stay."""
    if out.is_dir() and any(out.iterdir()):
        for entry in tmp.iterdir():
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # an earlier run's directory of the same name (e.g. checkpoint/)
            os.replace(entry, target)
        tmp.rmdir()
    else:
        os.replace(tmp, out)  # onto nothing, or onto an empty directory


@contextmanager
def reported_writes(target: Path, flag: str = "--out") -> Iterator[None]:
    """File system errors inside the block become one line naming ``target``."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(e, Path(target), flag) from e
        raise
