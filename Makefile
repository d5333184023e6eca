# Entry points used by the README and CI. The virtual environment is cached
# outside the checkout (torch is a large download) and reused when present.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/nlpstream
VENV ?= $(CACHE)/venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nlpstream-$(shell sha256sum pyproject.toml | cut -c1-16)-$(shell pwd | sha256sum | cut -c1-8)
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-tools

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.nlpstream-* && touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/nlpstream demo

# promtool and the Prometheus server (rule unit tests, the live rules test): Debian's package
test-tools:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	  else echo "the tests need promtool and prometheus: install Debian's 'prometheus' package" >&2; exit 1; fi; \
	fi

test: install test-tools
	HF_HUB_OFFLINE=1 PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -q -rs $(PYTEST_ARGS)

# the developer's loop: tests that need neither the broker nor the real model (about a minute)
test-fast: install
	HF_HUB_OFFLINE=1 PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -q -m "not kafka and not model" $(PYTEST_ARGS)
