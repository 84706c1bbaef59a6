# `make demo` and `make test` do all set-up on a fresh Debian 12 machine (as root).
PYTHON ?= python3
PYTEST_ARGS ?=
export PYTEST_INCUS_CACHE_DIR ?= /var/cache/pytest-incus

.PHONY: setup incus demo test lint unit bench

setup:
	bash scripts/setup-host.sh
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[dev]'

demo: setup
	PYTHON=$(PYTHON) bash scripts/kernel-headers.sh
	$(PYTHON) -m pytest examples -v -p no:cacheprovider

# the Incus server of the incus-backend tests: the container-only daemon, so that Debian's
# QEMU stays as it is (the bench's full incus brings QEMU 10.0)
incus: setup
	INCUS_SETUP_PACKAGE=incus-base bash scripts/incus-setup.sh

lint: setup
	$(PYTHON) -m ruff check pytest_incus guest_agent tests examples bench
	$(PYTHON) -m ruff format --check pytest_incus guest_agent tests examples bench
	$(PYTHON) -m mypy

# pytest exits 5 when it ran no test: make treats that, like any failure, as an error.
# Three runs:
# - the suite on two workers, one file per worker (so that a file's tests see each other's
#   cache changes only): instances wait mostly on guests and daemons, so two workers take
#   14 minutes here where one took about 22;
# - alone, the KVM verdict tests: they set the run cache's KVM verdict, which every VM
#   launched meanwhile would follow (a VM of another file took KVM beside them, and KVM does
#   not run guests on every host);
# - the integration tests of containers and apps again, unchanged, on this machine's Incus
#   (its VMs are refused here; tests of local-only internals skip, see README).
ALONE = tests/integration/test_kvm_verdict.py
WORKERS = -n 2 --dist loadfile
INCUS_PASS = --incus-backend=incus --incus-project=pytest-incus -k "not vm" $(WORKERS)
test: lint incus
	$(PYTHON) -m pytest tests --ignore=$(ALONE) -p no:cacheprovider -ra $(WORKERS) $(PYTEST_ARGS)
	$(PYTHON) -m pytest $(ALONE) -p no:cacheprovider -ra $(PYTEST_ARGS)
	$(PYTHON) -m pytest tests/integration -p no:cacheprovider -ra $(INCUS_PASS) $(PYTEST_ARGS)

bench: setup
	bash scripts/incus-setup.sh
	$(PYTHON) bench/launch.py
	$(PYTHON) bench/vm_launch.py
	$(PYTHON) bench/app_launch.py
	$(PYTHON) bench/net_launch.py
	$(PYTHON) bench/image_launch.py
	$(PYTHON) bench/incus_backend.py
