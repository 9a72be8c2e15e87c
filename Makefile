# atlasd developer commands. `make test` is what .ci/run calls.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test chaos demo bench bench-intake bench-trainer bench-learning clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip

install: $(PY)
	$(PIP) install -e '.[test]'
	# the Atlas SDK for tests/atlas_sdk.py, without its ~40 dependencies (see the comment in pyproject.toml)
	$(PIP) install --no-deps 'arc-atlas==0.1.16'

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# the chaos suite alone (tests/chaos; `make test` runs it too): the real daemon, stand-in children, injected faults
chaos: install
	$(PY) -m pytest -q -p no:cacheprovider tests/chaos

demo: install
	$(VENV)/bin/atlasd demo

bench-intake: install
	$(PY) -m bench.intake

bench-trainer: install
	$(PY) -m bench.trainer

# two tasks one after the other: forgetting, rehearsal and the non-regression gate (needs the Postgres of `make test`)
bench-learning: install
	$(PY) -m bench.learning

bench: bench-intake bench-trainer bench-learning

clean:
	rm -rf build dist *.egg-info .pytest_cache
