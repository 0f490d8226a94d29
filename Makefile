# sokd: `make demo` (set-up + the embedded default job), `make test` (set-up + tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sokd-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test test-slow wheel-check study bench clean

setup: $(STAMP) fmnist-data

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,export]'
	@touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist when missing and apt is usable (else the
# loader explains the other ways: data.root=..., data.download=true).
fmnist-data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null 2>&1 \
		|| echo "note: could not apt-get install dataset-fashion-mnist; see README (Data)"; fi

demo: setup
	$(VENV)/bin/sokd demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# Build the wheel from a copy of the tree, install it into a fresh virtualenv and run sokd from it
# (demo --help, models, one epoch of a packaged preset).
wheel-check: setup
	$(PY) -m pytest -q -m slow tests/test_wheel.py

# The reproduction study (hours on a CPU; resumable: rerun to continue) and the speed figures.
study: setup
	$(PY) benchmarks/study.py fmnist
	$(PY) benchmarks/study.py cifar100

bench: setup
	$(VENV)/bin/sokd bench --fp32-too vanilla --json docs/results/bench/wrn_40_2-wrn_40_1_b128_bf16.json
	$(PY) benchmarks/epoch_speed.py --steps 20 --json docs/results/bench/epoch_speed_cifar100.json

clean:
	rm -rf runs .pytest_cache
