"""Several processes with ``torch.distributed``: shared statistics, split solves, one result.

``bs.prune`` called inside an initialised process group (``torchrun --nproc-per-node P -m
brainsurgeon prune ...``, or your own ``dist.init_process_group``) runs the same pruning on every
rank, each rank calibrating on its own shard of the calibration data:

* **Statistics are reduced, never averaged per rank.** Every accumulator keeps *sums* over its rows
  (sum_n x_n x_n^T, sum_n g_n^2, the K-FAC sums of a a^T and s s^T, ...) and the number of rows it
  summed; :func:`all_reduce_sum` adds them over the ranks in float64 and the normalisation by the
  total row count happens after the reduction. A rank with more rows therefore weighs more, exactly
  as one process holding all rows would: H = (2 / sum_r N_r) sum_r X_r X_r^T.
* **Solves are split by layer.** Within a group of layers that read the same input (q, k, v; gate
  and up; every group is solved from the same reduced statistics), layer i of the group is solved
  by rank ``i % world`` and its new weights and mask are broadcast from that rank
  (:class:`SolveSplit`). Rows of one layer are not split: SparseGPT's and OBC's masks are chosen
  over the whole layer, so a row split would change the result.
* **Every rank ends with the identical model**; only rank 0 writes files (:func:`is_writer`).

Equality with one process: the reduced sums differ from the single-process sums only in the order
of float64 additions (relative error about 1e-16 per addition, measured below 1e-13 on H in the
tests), so the masks are identical unless two saliencies tie within that error, and the weights
agree to about 1e-10 relative (float64 models) / 1e-5 (float32), except after an iterative solve,
whose stopping rule sets the agreement (kfac-obs: conjugate gradients to a relative residual of
1e-6). The tests state and check these tolerances (tests/test_distributed.py). A Monte-Carlo
Fisher draws other labels on each rank than one process would: equal in distribution only.

Bad set-ups are caught before the work by :func:`check_setup`: ranks disagreeing on the options
(``num_samples`` included) or holding different model weights (a SHA-256 of every parameter and
buffer, compared across ranks) get one line naming the ranks. A rank that dies mid-run makes the
others fail at their next collective, with the process group's timeout as the bound (``torchrun``
CLI: ``--dist-timeout``, default 600 s): the error names the collective and the timeout instead of
hanging forever.

Shutdown: importing brainsurgeon imports ``torch.distributed.nn`` first (see :func:`_bind_defaults`),
and the CLI destroys the process group it created once the command ends (:func:`shutdown`).
"""
from __future__ import annotations

import hashlib
import importlib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import BrainsurgeonError
from .sequential import BlockHooks


def _bind_defaults() -> None:
    """Import ``torch.distributed.nn`` before any process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated at import. Imported
    after ``init_process_group`` (transformers imports it lazily when it builds a model), those
    defaults hold the default gloo group for the rest of the process, so ``destroy_process_group``
    cannot free it: its worker threads outlive the interpreter and can abort the process at exit
    ("terminate called without an active exception", SIGABRT, measured in 5 of 12 2-rank runs).
    Imported first, the defaults are ``None``. Costs ~2 ms after torch.
    """
    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.nn")


_bind_defaults()

#: what to tell a user whose collective failed
_HINT = (
    "another rank died, was killed, or is stuck; check every rank's log (the process group's timeout bounds "
    "the wait: --dist-timeout on the CLI, timeout= in dist.init_process_group)"
)


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if not is_distributed():
        return 0, 1
    dist = _dist()
    return dist.get_rank(), dist.get_world_size()


def is_writer() -> bool:
    """Only rank 0 writes files."""
    return world()[0] == 0


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one clear error (no traceback from gloo/nccl)."""
    try:
        yield
    except (RuntimeError, ConnectionError, TimeoutError) as e:
        rank = world()[0]
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BrainsurgeonError(f"rank {rank}: the {what} across ranks failed ({first}): {_HINT}") from e


def _comm_device(t: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors, nccl CUDA tensors: keep the tensor where the backend wants it
    backend = _dist().get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, what: str = "statistics reduction") -> torch.Tensor:
    """``t`` summed over the ranks, in float64 (a new tensor of ``t``'s dtype and device; ``t`` itself
    when not distributed)."""
    if not is_distributed():
        return t
    dev = _comm_device(t)
    buf = t.detach().to(device=dev, dtype=torch.float64).contiguous()
    with _collective(what):
        _dist().all_reduce(buf)
    return buf.to(device=t.device, dtype=t.dtype)


def all_reduce_count(n: int, what: str = "row-count reduction") -> int:
    """An integer (a row count) summed over the ranks."""
    if not is_distributed():
        return n
    t = torch.tensor([n], dtype=torch.float64)
    return int(round(float(all_reduce_sum(t, what)[0])))


def broadcast_(t: torch.Tensor, src: int, what: str = "broadcast of solved weights") -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s values (in place)."""
    if not is_distributed():
        return t
    dev = _comm_device(t)
    if t.dtype == torch.bool:  # not every backend broadcasts bool tensors
        buf = t.to(device=dev, dtype=torch.uint8).contiguous()
    else:
        buf = t.detach().to(dev).contiguous()
    with _collective(what):
        _dist().broadcast(buf, src)
    with torch.no_grad():
        t.copy_(buf.to(device=t.device, dtype=t.dtype))
    return t


def barrier(what: str = "wait for every rank") -> None:
    """Every rank waits here for the others (no-op outside a process group)."""
    if is_distributed():
        with _collective(what):
            _dist().barrier()


def stream_from_ranks(make_chunks) -> "Iterator[torch.Tensor]":
    """Every rank's chunks (e.g. per-sample gradients, rows x dim), rank 0's first, on every rank:
    ``make_chunks()`` yields this rank's; each chunk is broadcast from its rank after a header with
    its row count (-1 ends a rank's stream). Outside a process group: ``make_chunks()`` itself."""
    if not is_distributed():
        yield from make_chunks()
        return
    rank, size = world()
    for r in range(size):
        mine = iter(make_chunks()) if r == rank else None
        while True:
            chunk = next(mine, None) if r == rank else None
            header = torch.zeros(3, dtype=torch.int64)  # rows, columns, dtype code of the next chunk
            if r == rank:
                header[:] = torch.tensor([-1, 0, 0] if chunk is None else [*chunk.shape, _DTYPES.index(chunk.dtype)])
            broadcast_(header, r, "broadcast of a rank's gradient chunk")
            rows, dim, code = (int(v) for v in header)
            if rows < 0:
                break
            buf = chunk if r == rank else torch.empty(rows, dim, dtype=_DTYPES[code])
            broadcast_(buf, r, "broadcast of a rank's gradient chunk")
            yield buf


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _gather_bytes(payload: bytes, what: str) -> list[bytes]:
    """Every rank's fixed-length ``payload`` (no pickling: raw bytes in a uint8 tensor)."""
    _, size = world()
    mine = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    dev = _comm_device(mine)
    bufs = [torch.empty_like(mine, device=dev) for _ in range(size)]
    with _collective(what):
        _dist().all_gather(bufs, mine.to(dev))
    return [bytes(b.cpu().tolist()) for b in bufs]


def weights_digest(model: nn.Module) -> bytes:
    """SHA-256 over every parameter's and buffer's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type == "meta":
            continue
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def _disagreeing(digests: list[bytes]) -> list[int]:
    return [r for r, d in enumerate(digests) if d != digests[0]]


def check_setup(model: nn.Module, settings: dict) -> None:
    """Refuse, on every rank alike, ranks that disagree on ``settings`` (the run's options, the
    calibration sample count among them) or on the model's weights. One line, naming the ranks."""
    if not is_distributed():
        return
    options = hashlib.sha256(repr(sorted(settings.items())).encode()).digest()
    bad = _disagreeing(_gather_bytes(options, "comparison of the run's options"))
    if bad:
        raise BrainsurgeonError(
            f"rank(s) {bad} were given other options or another number of calibration samples than rank 0 "
            "(num_samples, method, sparsity, ...): every rank must run the same command on an equal-sized shard"
        )
    bad = _disagreeing(_gather_bytes(weights_digest(model), "comparison of model checksums"))
    if bad:
        raise BrainsurgeonError(
            f"rank(s) {bad} hold a different model than rank 0 (the SHA-256 of the weights differs): load the same "
            "weights on every rank"
        )


def shard_rows(n: int) -> slice:
    """This rank's contiguous share of ``n`` calibration samples (the CLI shards its windows so)."""
    rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def split_hooks(masks: dict, inner: BlockHooks | None = None) -> BlockHooks | None:
    """The block hooks of a distributed run (:class:`SplitHooks`), or ``inner`` when not distributed."""
    return SplitHooks(masks, inner) if is_distributed() else inner


class SplitHooks(BlockHooks):
    """Each rank solves the layers ``index % world == rank`` of a group; after the group every
    layer's weight and keep-mask are broadcast from the rank that solved it, so every rank goes on
    with the same pruned block. Loading, storing and releasing are delegated to ``inner``."""

    def __init__(self, masks: dict, inner: BlockHooks | None = None) -> None:
        self.masks, self.inner = masks, inner or BlockHooks()
        self.rank, self.size = world()
        self.solved_here = self.solved_total = 0

    def before_block(self, name, block):
        self.inner.before_block(name, block)

    def after_block(self, name, block):
        self.inner.after_block(name, block)

    def store(self, hidden):
        return self.inner.store(hidden)

    def prunes(self, name):
        return self.inner.prunes(name)

    def attach(self, masks):
        self.inner.attach(masks)

    def solves(self, index: int) -> bool:
        mine = index % self.size == self.rank
        self.solved_total += 1
        self.solved_here += int(mine)
        return mine

    def after_group(self, group) -> None:
        for j, t in enumerate(group):
            src = j % self.size
            mask = self.masks.get(t.name)
            if mask is None:  # solved by another rank: receive it
                mask = self.masks[t.name] = torch.ones(t.weight.shape, dtype=torch.bool, device=t.weight.device)
            broadcast_(t.weight.data, src)
            broadcast_(mask, src)
        self.inner.after_group(group)


def shutdown() -> None:
    """Destroy the process group (no-op when none is initialised), joining its worker threads
    before the interpreter exits. Called when a CLI command ends, after success or an error alike,
    so it does not wait for the other ranks: a rank that failed alone must not block in a barrier.
    Your own script calls ``dist.destroy_process_group()`` itself."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1);
    returns whether this process is distributed. gloo on CPU, nccl when CUDA is available."""
    import datetime
    import os

    dist = _dist()
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise BrainsurgeonError(f"cannot join the torchrun process group with backend {backend!r}: {e}") from e
    return True
