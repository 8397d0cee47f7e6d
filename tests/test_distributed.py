"""torch.distributed with gloo, 2 processes on the CPU: the same result as one process, clear errors.

Each scenario starts two ranks (``torch.multiprocessing`` spawn, a file rendezvous in tmp_path: no
port), runs several prunings in them and writes what it got to safetensors files that the test
compares with a single-process run on all the data.

Tolerance, as ``distributed.py`` states: the reduced statistics differ from the single-process ones
only by the order of float64 additions, so on a float64 model the masks are identical and the
weights agree to 1e-10 (relative to the largest weight).
"""
from __future__ import annotations

import contextlib
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
#: gradient-based methods, with their deterministic curvature (a sampled Fisher draws other labels
#: on each rank than one process does, so it is equal only in distribution)
GRADIENT = {"obd": {"curvature": "empirical"}, "kfac-obs": {"fisher": "empirical", "cg_iters": 2000}, "woodfisher": {}}
#: relative weight tolerance: float64 reduction order (1e-10), except where an iterative solve
#: amplifies it: kfac-obs's conjugate gradients, here run to their relative residual of 1e-6
#: (cg_iters=2000; with the default 25 iterations the stop is by count: measured 7.7e-5)
WEIGHT_RTOL = {"kfac-obs": 1e-6}
WORLD = 2


def _model():
    from test_hf_adapter import tiny_llama

    return tiny_llama(seed=0, layers=2, hidden=32, dtype=torch.float64)


def _tokens():
    from test_hf_adapter import tokens

    return tokens(n=8, length=12, seed=3)


def _mlp_case():
    from conftest import fit, tiny_data, tiny_mlp

    data = tiny_data(n=48)
    return fit(tiny_mlp().double(), (data[0].double(), data[1])), (data[0].double(), data[1])


def _flat(res) -> dict[str, torch.Tensor]:
    out = {f"mask.{k}": v.to(torch.uint8) for k, v in res.masks.items()}
    out.update({f"weight.{k}": v.detach().clone().contiguous() for k, v in res.model.state_dict().items()
                if k.endswith("weight") and not k.endswith("embed_tokens.weight") and "lm_head" not in k})
    return out


@contextlib.contextmanager
def _per_batch_products():
    """Every calibration batch its own X^T X product, as token batches of real size are (4096 rows
    of 576 for SmolLM2): the tiny test batches would otherwise be pooled into one float32 product."""
    from brainsurgeon.curvature.layer_inputs import _Accumulator

    old = _Accumulator.OWN_PRODUCT_ELEMENTS
    _Accumulator.OWN_PRODUCT_ELEMENTS = 1
    try:
        yield
    finally:
        _Accumulator.OWN_PRODUCT_ELEMENTS = old


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
    with _per_batch_products():
        res = bs.prune(_model().float(), shard, "sparsegpt", 0.5, batch_size=2)
    save_file(_flat(res), str(out / f"sparsegpt-float32-{rank}.safetensors"))
    for method, options in GRADIENT.items():
        res = bs.prune(model, shard, method, 0.5, batch_size=2, **options)
        save_file(_flat(res), str(out / f"{method}-{rank}.safetensors"))
    mlp, (x, y) = _mlp_case()
    rows = shard_rows(len(x))
    res = bs.prune(mlp, (x[rows], y[rows]), "obd", 0.5, structure="channel", batch_size=8)
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, str(out / f"channel-obd-{rank}.safetensors"))
    res = bs.prune(str(out / "src"), shard, "sparsegpt", 0.5, batch_size=2, offload="disk", out=out / "offload")
    (out / f"offload-{rank}.txt").write_text(f"{res.report['overall']['achieved_sparsity']}")
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
    (out / f"threads-{rank}.txt").write_text("\n".join(_thread_names()))


def _thread_names() -> list[str]:
    """This process's native threads by name (Linux: gloo's are gloo_tcp_loop and pt_gloo_runloop)."""
    tasks = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.is_dir() else ["unknown"]


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
    _model().save_pretrained(tmp / "src")
    assert _run("prune", tmp) == [0, 0]
    return tmp


def test_destroying_the_group_ends_its_threads(two_ranks):
    """The workers built transformers models inside the group (transformers then imports
    torch.distributed.nn, whose defaults would hold the group): destroy_process_group must still
    free it, else its threads outlive the interpreter and can abort the process at exit."""
    for r in range(WORLD):
        names = (two_ranks / f"threads-{r}.txt").read_text().split("\n")
        if names == ["unknown"]:
            pytest.skip("no /proc/self/task on this system to list threads")
        assert not [n for n in names if "gloo" in n], names


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


def test_float32_sparsegpt_two_ranks_same_masks_as_one_process(two_ranks):
    """float32: each batch's X^T X is formed in float32 and summed in float64, so the ranks' sums
    differ from one process's by float64 addition order only: identical masks, float32-close weights
    (on SmolLM2 with the same threads per process the model is bit-identical: BENCHMARKS.md)."""
    with _per_batch_products():
        single = _flat(bs.prune(_model().float(), _tokens(), "sparsegpt", 0.5, batch_size=2))
    ranks = [load_file(str(two_ranks / f"sparsegpt-float32-{r}.safetensors")) for r in range(WORLD)]
    for key, ref in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.startswith("mask."):
            assert torch.equal(ranks[0][key], ref), key
        else:
            assert (ranks[0][key] - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1.0), key


@pytest.mark.parametrize("method", sorted(GRADIENT))
def test_gradient_methods_two_ranks_equal_one_process(two_ranks, method):
    """The diagonal Fisher, the K-FAC factors and WoodFisher's gradients are reduced over the ranks."""
    single = _flat(bs.prune(_model(), _tokens(), method, 0.5, batch_size=2, **GRADIENT[method]))
    ranks = [load_file(str(two_ranks / f"{method}-{r}.safetensors")) for r in range(WORLD)]
    for key, ref in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.startswith("mask."):
            assert torch.equal(ranks[0][key], ref), key
        else:
            rtol = WEIGHT_RTOL.get(method, 1e-10)
            assert (ranks[0][key] - ref).abs().max() <= rtol * ref.abs().max().clamp_min(1.0), key


def test_structured_criterion_two_ranks_equal_one_process(two_ranks):
    mlp, data = _mlp_case()
    single = bs.prune(mlp, data, "obd", 0.5, structure="channel", batch_size=8).model.state_dict()
    ranks = [load_file(str(two_ranks / f"channel-obd-{r}.safetensors")) for r in range(WORLD)]
    for key, ref in single.items():
        assert ranks[0][key].shape == ref.shape and torch.equal(ranks[0][key], ranks[1][key]), key
        assert (ranks[0][key] - ref).abs().max() <= 1e-10 * ref.abs().max().clamp_min(1.0), key


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


def test_two_ranks_out_of_core_equal_one_process(two_ranks, tmp_path):
    """Out of core under torch.distributed: rank 0 alone writes, and the result is the 1-process one."""
    single = bs.prune(str(two_ranks / "src"), _tokens(), "sparsegpt", 0.5, batch_size=2, offload="disk", out=tmp_path / "o")
    assert single.report["overall"]["achieved_sparsity"] == 0.5
    got = transformers.AutoModelForCausalLM.from_pretrained(two_ranks / "offload", dtype=torch.float64).state_dict()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float64).state_dict()
    for k, v in ref.items():
        assert torch.equal(got[k] == 0, v == 0), k
        assert (got[k] - v).abs().max() <= 1e-10 * v.abs().max().clamp_min(1.0), k
    assert [(two_ranks / f"offload-{r}.txt").read_text() for r in range(WORLD)] == ["0.5", "0.5"]
    assert not (two_ranks / ".offload.partial").exists()
