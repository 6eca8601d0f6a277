# `make demo` and `make test` create .venv when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench bench-auto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ntk-dynamics curves --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_ntk.py

bench-auto: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_auto.py

clean:
	rm -rf $(VENV) runs
