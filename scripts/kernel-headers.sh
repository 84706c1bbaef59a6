#!/usr/bin/env bash
# Install the headers of exactly the kernel that the debian/12 VM image carries, and what
# building a module against them needs, for the kernel-module example. Builds (or finds in the
# cache) the VM image first: its record names the kernel release. Used by `make demo`.
set -euo pipefail
PYTHON=${PYTHON:-python3}

release=$("$PYTHON" - <<'PY'
import sys
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings, default_cache_dir

store = ImageStore(Settings(default_cache_dir()), progress=lambda m: print(m, file=sys.stderr))
print(store.get("debian/12", "vm").kernel_release)
PY
)
if [ -d "/lib/modules/$release/build" ]; then
  exit 0
fi
echo "kernel-headers: installing linux-headers-$release for the kernel-module example"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "linux-headers-$release" make gcc libc6-dev >/dev/null
