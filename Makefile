# Two commands do all set-up on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test unit lint bench clean agent-clis

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/shardline up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Claude Code and Codex from npm, pinned, into the venv (tests/integration/test_agent_clis.py installs them too)
agent-clis: install
	$(BIN)/python -m tests.support.agent_clis

unit: install
	$(BIN)/pytest tests/unit tests/workflows -q

# the tests mostly wait on processes: 4 workers, each with its own session cluster, each running whole files (a
# file's tests share module-scoped runners and clusters), the longest files first (tests/conftest.py)
test: lint
	$(BIN)/pytest -q -p no:cacheprovider -n 4 --dist loadfile --no-loadscope-reorder --durations=25

bench: install
	$(BIN)/python -m bench.download
	$(BIN)/python -m bench.speed
	$(BIN)/python -m bench.batching
	$(BIN)/python -m bench.batching --size 576x12 --dtype float16 --levels 1,8 --out bench/out/speed_goals.json
	$(BIN)/python -m bench.grammar
	$(BIN)/python -m bench.speculative
	$(BIN)/python -m bench.pipeline_split
	$(BIN)/python -m bench.idle_first_token
	$(BIN)/python -m bench.pipeline_overlap
	$(BIN)/python -m bench.ring_wait
	$(BIN)/python -m bench.runner_start

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
