# induction-lab. `make demo` and `make test` work on a fresh machine: they build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TL := .venv-tl
TL_STAMP := $(TL)/.installed

DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: demo test test-slow lint bench bench-tl-env device-wheels venv clean docs docs-build check-experiments

venv: $(STAMP)

# the lab, and the worked plug-in example (examples/noisy_copy: its entry point registers a task, a measure,
# a clamp value and an evaluator; the tests train, replay, fork, resume and compare through it)
$(STAMP): pyproject.toml examples/noisy_copy/pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]" -e examples/noisy_copy
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lab train experiment=demo

# the fast suite (under 10 minutes on 2 cores); `make test-slow` runs the whole-process tests, CI runs both.
# Two pytest workers (pytest-xdist): most of a small test's time is XLA compiling, one thread each, so two
# workers on 2 cores run the suite in about half the time (4:48 against 9:13 on the 2-core CPU)
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n 2 --durations=15

# the slow suite also needs the optional torch environment: devinterp's LLC on lab checkpoints (test_devinterp.py)
test-slow: $(STAMP) $(TL_STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python bench/run.py

# every experiment's default over 5 seeds as batches (hours on 2 cores for all; --experiments picks some):
# the table of seeds with an induction circuit, median transition step and time
check-experiments: $(STAMP)
	$(BIN)/python bench/check_experiments.py $(ARGS)

# the documentation site (mkdocs.yml, docs/): the notebooks are executed in their small mode first (docs/hooks/)
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,docs]" -e examples/noisy_copy
	touch $(DOCS_STAMP)

# strict: every link, anchor and API reference must resolve; a fresh execution of the notebooks
docs-build: $(DOCS_STAMP)
	rm -rf docs/notebooks
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# the optional torch environment, .venv-tl: TransformerLens (the baseline of `make bench`) and devinterp (its LLC
# on lab checkpoints, side by side with the lab's: bench/devinterp_side_by_side.py, and the slow suite)
bench-tl-env: $(TL_STAMP)

$(TL_STAMP): bench/requirements-tl.txt
	test -d $(TL) || $(PY) -m venv $(TL)
	$(TL)/bin/python -m pip install -q -r bench/requirements-tl.txt
	touch $(TL_STAMP)

# the lab's pure-Python needs that an accelerator machine without package access lacks (JAX, flax, optax,
# orbax there are its own), as wheels in .whl/ for bench/accelerator.sh
device-wheels: $(STAMP)
	$(BIN)/python -m pip wheel -q --no-deps -w .whl \
		$$($(BIN)/python -m pip list --format=freeze 2>/dev/null | grep -i -E '^(hydra-core|omegaconf|antlr4-python3-runtime)==')

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(TL) .pytest_cache site docs/notebooks
