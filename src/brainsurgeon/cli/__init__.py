"""The ``brainsurgeon`` command line. Each command module registers its commands on ``app``.

Global options (before the command): ``--version``, and ``--threads N`` (or the environment variable
``BRAINSURGEON_THREADS``), the CPU threads of torch and of numpy/scipy's BLAS. The default is half
the CPUs this process may run on, at least 1 and at most 8 (:func:`default_threads`): torch's own
default of one thread per core oversubscribes a machine whose cores are shared (on 2 shared cores,
``train`` on Fashion-MNIST took 104.6 s with torch's default and 5.7 s with one thread).
"""
from __future__ import annotations

import errno
import importlib
import os
import re
import sys
from typing import Annotated, Iterable, Optional

import typer

app = typer.Typer(
    name="brainsurgeon",
    help="Prune PyTorch networks by the curvature of the loss or by classic criteria.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules, each adding its commands to `app` when imported.
COMMAND_MODULES = ("brainsurgeon.cli.core", "brainsurgeon.cli.export", "brainsurgeon.cli.pipeline")
THREADS_ENV = "BRAINSURGEON_THREADS"
MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    """Half the CPUs available to this process (its affinity mask), within [1, 8]."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cpus // 2))


def resolve_threads(option: int | None) -> int:
    """The thread count: ``--threads``, else ``$BRAINSURGEON_THREADS``, else :func:`default_threads`."""
    from ..errors import BrainsurgeonError

    if option is not None:
        if option < 1:
            raise BrainsurgeonError(f"--threads must be a positive integer, got {option}")
        return option
    text = os.environ.get(THREADS_ENV)
    if text is not None and text.strip():
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise BrainsurgeonError(f"{THREADS_ENV}={text!r} must be a positive integer (CPU threads)")
        return n
    return default_threads()


def set_threads(n: int):
    """torch's intra-op threads and the BLAS pools of numpy/scipy (threadpoolctl); returns a function
    that restores the previous settings (for a command run inside a Python process, e.g. a test)."""
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    limits = threadpool_limits(n)  # first: it records the OpenMP pool's size before torch changes it
    torch.set_num_threads(n)

    def restore() -> None:
        limits.restore_original_limits()
        torch.set_num_threads(previous)

    return restore


_PY_KEYWORD = re.compile(r"\b([a-z][a-z0-9_]*)=('([^']*)'|\"([^\"]*)\"|([\w.:+-]+))?")


def cli_message(text: str, names: Iterable[str] | None = None, yaml: bool = False) -> str:
    """The engine's Python spelling in CLI spelling: ``structure='channel'`` -> ``--structure channel``,
    ``compact=False`` -> ``--no-compact``, ``round_to=`` -> ``--round-to``, for the given option names
    (a command's parameters); with ``yaml``, in a recipe's spelling: ``structure: channel``."""
    names = set(names or ())

    def spell(m: re.Match) -> str:
        name = m.group(1)
        if name not in names:
            return m.group(0)
        value = next((g for g in m.groups()[2:] if g is not None), None)
        if yaml:
            return name if value is None else f"{name}: {value.lower() if value in ('True', 'False') else value}"
        flag = "--" + name.replace("_", "-")
        if value is None:  # "round_to= applies to ...": the option itself
            return flag
        if value in ("True", "False"):
            return flag if value == "True" else "--no-" + flag[2:]
        return f"{flag} {value}"

    return _PY_KEYWORD.sub(spell, text)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"brainsurgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help=f"CPU threads for torch and BLAS (default: ${THREADS_ENV}, else half the CPUs, 1 to 8)",
    )] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit",
    )] = False,
    dist_timeout: Annotated[float, typer.Option(
        "--dist-timeout", help="under torchrun: seconds a rank waits for the others before failing", min=1.0,
    )] = 600.0,
) -> None:
    """Prune PyTorch networks by the curvature of the loss or by classic criteria.

    Under ``torchrun --nproc-per-node P -m brainsurgeon ...`` every rank joins the process group
    (gloo on CPU, nccl with CUDA) and calibrates on its share of the data; only rank 0 writes."""
    from .. import progress
    from ..distributed import init_from_env, shutdown
    from ..errors import BrainsurgeonError

    try:
        n = resolve_threads(threads)
        if init_from_env(timeout_s=dist_timeout):
            ctx.call_on_close(shutdown)
    except BrainsurgeonError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    restore = set_threads(n)
    # without a terminal, progress is one line per stage on stderr (commands' --quiet turns it off)
    progress.set_stage_lines(True)
    ctx.call_on_close(restore)
    ctx.call_on_close(lambda: progress.set_stage_lines(False))


def _stdout_failed(e: OSError) -> None:
    """A full or read-only stdout: one line on stderr and exit 2 (the unwritten text is dropped)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
    os.close(devnull)
    sys.stderr.write(f"error: cannot write the output: {e.strerror or e} (errno {e.errno})\n")
    sys.exit(2)


def main() -> None:
    from ..outputs import WRITE_ERRNOS

    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a missing dependency inside a command module is a real error
                raise
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # a full stdout fails here, not in the interpreter's exit
    except OSError as e:
        if e.errno not in WRITE_ERRNOS | {errno.EPIPE}:
            raise
        _stdout_failed(e)
