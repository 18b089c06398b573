# Set-up and entry points. Both targets create the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo smoke test lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: teacher -> pairs -> students (nfm, independent, minibatch-ot, sd-ot) -> FID/KID -> report
	$(VENV)/bin/nfm run --preset digits

smoke: $(STAMP)  ## every stage on a toy budget (seconds): nfm run --preset tiny
	$(VENV)/bin/nfm --quiet run --preset tiny --run-dir runs/run-tiny  # the whole log: runs/run-tiny/log.txt

test: $(STAMP)  ## the test suite (CPU only), one worker per core
	$(VENV)/bin/python -m pytest -q -n auto --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/python -m tests.layers

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/teacher_bench.py
	$(VENV)/bin/python benchmarks/decode_bench.py
	$(VENV)/bin/python benchmarks/pairs_bench.py
	$(VENV)/bin/python benchmarks/student_bench.py

clean-venv:
	rm -rf $(VENV)
