# The two commands of README: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bundles

setup:
	@bash scripts/setup_env.sh $(VENV)

demo: setup
	$(VENV)/bin/volseg demo

# pytest's exit status 5 (no tests collected) is a failure here, not a pass.
test: setup
	@$(PY) -m pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check volseg tests scripts
	$(VENV)/bin/ruff format --check volseg tests scripts
	$(VENV)/bin/mypy volseg

bundles: setup
	$(VENV)/bin/volseg export-bundles
