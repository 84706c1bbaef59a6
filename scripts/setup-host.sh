#!/usr/bin/env bash
# Install what pytest-incus needs on a Debian 12 host, as root. Safe to run again: each step
# checks first. Used by `make demo` and `make test`.
set -euo pipefail

# containers: liblxc and its Python bindings' build needs, debootstrap, busybox, newuidmap;
# VMs: QEMU, qemu-img, mkfs.ext4 (e2fsprogs), lz4 and zstd (Debian's kernels are packed with
# them); OCI images: skopeo, umoci, and for the tests' loopback registries docker-registry,
# openssl (their TLS certificates) and apache2-utils (htpasswd: bcrypt hashes of their logins);
# host-only networks: iproute2 (ip: bridges, veth and tap devices), nftables (nft: each bridge's
# table that keeps its packets on the host) and dnsmasq-base (/usr/sbin/dnsmasq, each bridge's
# DNS server; not the `dnsmasq` package, which adds a system-wide service);
# images: from simplestreams servers: squashfs-tools (unsquashfs, and mksquashfs for the tests'
# images) and incus-extra (incus-simplestreams, which writes the tests' image trees; only in
# bookworm-backports, whose source is added if no apt source names it);
# the incus backend's cluster tests: jq (scripts/incus-cluster.sh reads Incus's JSON)
PACKAGES=(lxc lxc-dev pkg-config debootstrap busybox-static uidmap
          qemu-system-x86 qemu-utils e2fsprogs lz4 zstd
          skopeo umoci docker-registry openssl apache2-utils
          iproute2 nftables dnsmasq-base
          squashfs-tools incus-extra jq)
BACKPORTS_ONLY=(incus-extra)
BACKPORTS_LIST=/etc/apt/sources.list.d/bookworm-backports.list
ID_RANGE=1000000-1065535  # host ids of root..65535 inside unprivileged containers

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host: run as root (system containers need it)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  # no service of these packages may start on the host: tests start their own registries on
  # loopback, and nftables' service would load /etc/nftables.conf, which flushes the host's
  # whole firewall (the plugin only adds tables of its own)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
  fi
  for p in "${BACKPORTS_ONLY[@]}"; do
    if [[ " ${missing[*]} " == *" $p "* ]] && ! grep -Eqs '(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
      echo "setup-host: enabling bookworm-backports (for ${BACKPORTS_ONLY[*]}) in $BACKPORTS_LIST"
      printf 'deb http://deb.debian.org/debian bookworm-backports main\n' > "$BACKPORTS_LIST"
    fi
  done
  # a package found only in backports installs from there without -t: its dependencies come
  # from bookworm, as everything else does
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# unprivileged containers map their ids onto a range that root must own in /etc/subuid, subgid
covers() {  # file: does a root line cover 1000000..1065535?
  awk -F: '($1 == "root" || $1 == "0") && $2 <= 1000000 && $2 + $3 >= 1065536 { ok = 1 }
           END { exit !ok }' "$1" 2>/dev/null
}
if ! covers /etc/subuid || ! covers /etc/subgid; then
  echo "setup-host: giving root the id range $ID_RANGE for unprivileged containers"
  usermod --add-subuids "$ID_RANGE" --add-subgids "$ID_RANGE" root
fi
