# `make demo` and `make test` do all set-up on a fresh Debian 12 machine (as root).
PYTHON ?= python3
PYTEST_ARGS ?=
export PYTEST_INCUS_CACHE_DIR ?= /var/cache/pytest-incus

.PHONY: setup demo test lint unit bench

setup:
	bash scripts/setup-host.sh
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[dev]'

demo: setup
	PYTHON=$(PYTHON) bash scripts/kernel-headers.sh
	$(PYTHON) -m pytest examples -v -p no:cacheprovider

lint: setup
	$(PYTHON) -m ruff check pytest_incus guest_agent tests examples bench
	$(PYTHON) -m ruff format --check pytest_incus guest_agent tests examples bench
	$(PYTHON) -m mypy

# pytest exits 5 when it ran no test: make treats that, like any failure, as an error
test: lint
	$(PYTHON) -m pytest tests -p no:cacheprovider -ra $(PYTEST_ARGS)

bench: setup
	bash scripts/incus-setup.sh
	$(PYTHON) bench/launch.py
	$(PYTHON) bench/vm_launch.py
	$(PYTHON) bench/app_launch.py
	$(PYTHON) bench/net_launch.py
	$(PYTHON) bench/image_launch.py
