"""torch.distributed with gloo, 2 processes on the CPU: the same result as one process, clear errors.

Each scenario starts two ranks (``torch.multiprocessing`` spawn, a file rendezvous in tmp_path: no
port), runs several prunings in them and writes what it got to safetensors files that the test
compares with a single-process run on all the data.

Tolerance, as ``distributed.py`` states: the reduced statistics differ from the single-process ones
only by the order of float64 additions, so on a float64 model the masks are identical and the
weights agree to 1e-10 (relative to the largest weight).
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import brainsurgeon as bs
from brainsurgeon.distributed import shard_rows
from brainsurgeon.errors import BrainsurgeonError

transformers = pytest.importorskip("transformers")

METHODS = ("sparsegpt", "wanda")
WORLD = 2


def _model():
    from test_hf_adapter import tiny_llama

    return tiny_llama(seed=0, layers=2, hidden=32, dtype=torch.float64)


def _tokens():
    from test_hf_adapter import tokens

    return tokens(n=8, length=12, seed=3)


def _flat(res) -> dict[str, torch.Tensor]:
    out = {f"mask.{k}": v.to(torch.uint8) for k, v in res.masks.items()}
    out.update({f"weight.{k}": v.detach().clone().contiguous() for k, v in res.model.state_dict().items()
                if k.endswith("weight") and not k.endswith("embed_tokens.weight") and "lm_head" not in k})
    return out


def _error(fn) -> str:
    try:
        fn()
    except BrainsurgeonError as e:
        return str(e)
    return ""


def _worker(rank: int, scenario: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    out = Path(out_dir)
    model, data = _model(), _tokens()
    shard = data[shard_rows(len(data))]
    if scenario == "die":
        if rank == 1:
            os._exit(3)  # a rank dying before the first collective of the run
        t0 = time.time()
        msg = _error(lambda: bs.prune(model, shard, "wanda", 0.5, batch_size=2))
        (out / "die.txt").write_text(f"{time.time() - t0:.1f}\n{msg}")
        os._exit(0)  # the group is broken: no orderly shutdown
    for method in METHODS:
        res = bs.prune(model, shard, method, 0.5, batch_size=2)
        save_file(_flat(res), str(out / f"{method}-{rank}.safetensors"))
        (out / f"{method}-{rank}.json").write_text(str(res.report["calibration"]))
    other = _model()
    if rank == 1:
        with torch.no_grad():
            other.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    msgs = [
        _error(lambda: bs.prune(other, shard, "wanda", 0.5, batch_size=2)),
        _error(lambda: bs.prune(model, shard, "wanda", 0.5, batch_size=2, num_samples=4 if rank == 0 else 3)),
    ]
    (out / f"errors-{rank}.txt").write_text("\n".join(msgs))
    dist.destroy_process_group()


def _run(scenario: str, tmp_path: Path) -> list[int]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, scenario, str(tmp_path / "rdzv"), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    assert _run("prune", tmp) == [0, 0]
    return tmp


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process(two_ranks, method):
    single = _flat(bs.prune(_model(), _tokens(), method, 0.5, batch_size=2))
    ranks = [load_file(str(two_ranks / f"{method}-{r}.safetensors")) for r in range(WORLD)]
    assert set(ranks[0]) == set(single)
    for key, ref in single.items():
        # every rank ends with the identical model (bit for bit: the solved weights are broadcast)
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.startswith("mask."):
            assert torch.equal(ranks[0][key], ref), key  # masks identical to one process
        else:
            scale = ref.abs().max().clamp_min(1.0)
            assert (ranks[0][key] - ref).abs().max() <= 1e-10 * scale, key
    # both ranks walked the blocks (the split solves only run on the block-sequential path)
    assert "block-sequential" in (two_ranks / f"{method}-0.json").read_text()


def test_mismatched_model_and_options_are_one_line_errors(two_ranks):
    for r in range(WORLD):
        model_msg, options_msg = (two_ranks / f"errors-{r}.txt").read_text().split("\n")
        assert "rank(s) [1] hold a different model" in model_msg
        assert "rank(s) [1] were given other options or another number of calibration samples" in options_msg


def test_a_dead_rank_is_an_error_not_a_hang(tmp_path):
    codes = _run("die", tmp_path)
    assert codes[1] == 3 and codes[0] == 0
    seconds, msg = (tmp_path / "die.txt").read_text().split("\n", 1)
    assert "failed" in msg and "another rank died" in msg and "\n" not in msg
    assert float(seconds) < 60  # bounded by the 30 s process-group timeout
