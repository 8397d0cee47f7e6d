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

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
