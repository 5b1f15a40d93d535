# induction-lab. `make demo` and `make test` work on a fresh machine: they build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench bench-tl-env device-wheels venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lab train experiment=demo

# the fast suite (under 10 minutes on 2 cores); `make test-slow` runs the whole-process tests, CI runs both
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python bench/run.py

# optional: the TransformerLens (torch) baseline that `make bench` compares against, in .venv-tl
bench-tl-env:
	test -d .venv-tl || $(PY) -m venv .venv-tl
	.venv-tl/bin/python -m pip install -q -r bench/requirements-tl.txt

# the lab's pure-Python needs that an accelerator machine without package access lacks (JAX, flax, optax,
# orbax there are its own), as wheels in .whl/ for bench/accelerator.sh
device-wheels: $(STAMP)
	$(BIN)/python -m pip wheel -q --no-deps -w .whl \
		$$($(BIN)/python -m pip list --format=freeze 2>/dev/null | grep -i -E '^(hydra-core|omegaconf|antlr4-python3-runtime)==')

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .venv-tl .pytest_cache
