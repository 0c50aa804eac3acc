# Two commands matter: `make demo` (the main job: the length-bias labs, lab/)
# and `make test`. `make bench` times the losses (bench/).
# Both create .venv if missing, install what is needed once, and build the
# extension in release mode.

VENV   ?= .venv
PY     := $(VENV)/bin/python
VERL   := verl==0.9.1
STAMP  := $(VENV)/.installed
BUILT  := $(VENV)/.built
SOURCES := $(shell find src python -type f \( -name '*.rs' -o -name '*.py' -o -name '*.pyi' -o -name '*.cu' \) 2>/dev/null) Cargo.toml pyproject.toml

.PHONY: demo test bench build venv clean cxx

demo: $(BUILT)
	$(PY) -m lab

test: $(BUILT) cxx
	cargo test --release
	$(PY) -m pytest -q tests

# The CUDA simulator (src/cuda/sim.rs) builds the kernels with the host's C++ compiler.
cxx:
	@command -v $${CXX:-g++} >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq g++ >/dev/null; } || \
		{ echo "make test needs a C++ compiler for the CUDA simulator: install g++ or set CXX" >&2; exit 1; }

bench: $(BUILT)
	$(PY) bench/demo.py
	$(PY) bench/bench.py
	$(PY) bench/bench_advantage.py

build: $(BUILT)

venv: $(STAMP)

$(STAMP): requirements-test.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps $(VERL)
	touch $@

$(BUILT): $(STAMP) $(SOURCES)
	$(VENV)/bin/maturin develop --release -q
	touch $@

clean:
	rm -rf target $(VENV)
