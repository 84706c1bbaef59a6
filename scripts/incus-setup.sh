#!/usr/bin/env bash
# Install and start a real Incus on Debian 12 (as root): the server of the test
# suite's incus-backend tests, and the baseline of the benchmarks.
#
# Idempotent: every step checks first, so a re-run on a ready machine takes well
# under a second. Works without systemd as PID 1 (the daemon is started by hand).
#
#   sudo bash scripts/incus-setup.sh
#
# Steps:
#   1. enable bookworm-backports (only if no apt source names it yet),
#   2. apt-get install -t bookworm-backports incus (only if not installed), with
#      service start-ups during the install suppressed (a temporary policy-rc.d),
#   3. start /usr/libexec/incus/incusd --group root in the background unless the
#      daemon already answers, log in /var/log/incus/incusd-bench.log,
#   4. create the "default" dir storage pool and the default profile's root disk
#      (no network device and no bridge: benchmark instances need no network),
#      and point incusd's HTTP(S) proxy at a closed loopback port so that it makes
#      no outbound requests (see configure below),
#   5. for the test suite: the project "pytest-incus", whose default profile's root
#      disk is on the pool "pytest-incus" (btrfs on a loop file when the kernel has
#      btrfs: instances are snapshots of their image, about twice as fast to create
#      and delete as on "dir"); and an HTTPS listener on 127.0.0.1:8443 only (loopback:
#      the tests of client certificates), unless core.https_address is set already,
#   6. print the client and server version.
#
# A daemon started here runs as its own session leader (pid in /run/incusd-bench.pid)
# and keeps running after the script; stop it with `incus admin shutdown`.
#
# Environment knobs:
#   INCUS_SETUP_TIMEOUT       seconds to wait for the daemon (default 30)
#   INCUS_SETUP_LOG           daemon log file (default /var/log/incus/incusd-bench.log)
#   INCUS_SETUP_KEEP_PROXY=1  leave core.proxy_http(s) unset
#   INCUS_SETUP_PACKAGE       package to install (default "incus", which also pulls in
#                             QEMU 10.0 for VMs; "incus-base" is the container-only daemon,
#                             with about a third as many packages to install, which leaves
#                             Debian's QEMU as it is: `make test` installs that one)
#   INCUS_SETUP_POOL_SIZE     size of the test pool's loop file (default 20GiB; sparse)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

readonly INCUSD=/usr/libexec/incus/incusd
readonly SOCKET=/var/lib/incus/unix.socket
readonly TIMEOUT="${INCUS_SETUP_TIMEOUT:-30}"
readonly LOG="${INCUS_SETUP_LOG:-/var/log/incus/incusd-bench.log}"
readonly PACKAGE="${INCUS_SETUP_PACKAGE:-incus}"
readonly PIDFILE=/run/incusd-bench.pid
readonly BACKPORTS_LIST=/etc/apt/sources.list.d/bookworm-backports.list
# apt and dpkg may be busy with another job on the same machine: wait for the lock.
readonly APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
readonly TEST_PROJECT=pytest-incus
readonly TEST_POOL=pytest-incus
readonly HTTPS_ADDRESS=127.0.0.1:8443

log() { printf 'incus-setup: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ ${EUID} -eq 0 ]] || die "must run as root"

# --- 1 + 2: install ----------------------------------------------------------

incus_installed() {
    [[ -x ${INCUSD} ]] && command -v incus >/dev/null 2>&1 \
        && [[ "$(dpkg-query -W -f='${Status}' "${PACKAGE}" 2>/dev/null || true)" == "install ok installed" ]]
}

enable_backports() {
    # Any existing .list or deb822 .sources entry for bookworm-backports counts.
    if grep -Eqs '(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
        return 0
    fi
    log "enabling bookworm-backports in ${BACKPORTS_LIST}"
    printf 'deb http://deb.debian.org/debian bookworm-backports main\n' >"${BACKPORTS_LIST}"
}

# Without systemd as PID 1 the package's maintainer scripts must not try to
# start services: deb-systemd-invoke and invoke-rc.d both honour policy-rc.d,
# and exit code 101 means "action forbidden". An existing policy-rc.d is left
# as it is; one created here is removed again, whatever happens.
CREATED_POLICY=0
remove_policy() {
    if [[ ${CREATED_POLICY} -eq 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
        CREATED_POLICY=0
    fi
}
trap remove_policy EXIT

install_incus() {
    if incus_installed; then
        log "${PACKAGE} already installed ($(dpkg-query -W -f='${Version}' "${PACKAGE}"))"
        return 0
    fi
    enable_backports
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary, from pytest-incus scripts/incus-setup.sh\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        CREATED_POLICY=1
    fi
    local start=${SECONDS}
    log "apt-get update"
    apt-get "${APT_OPTS[@]}" update -q
    # No recommends: they add apparmor, dnsmasq and QEMU's optional extras,
    # none of which a container benchmark without network needs.
    log "apt-get install -t bookworm-backports ${PACKAGE}"
    apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends \
        -t bookworm-backports "${PACKAGE}"
    remove_policy
    incus_installed || die "${PACKAGE} did not install"
    log "installed ${PACKAGE} $(dpkg-query -W -f='${Version}' "${PACKAGE}") in $((SECONDS - start)) s"
}

# --- 3: daemon ----------------------------------------------------------------

daemon_answers() {
    [[ -S ${SOCKET} ]] && timeout 10 incus info >/dev/null 2>&1
}

# The pid of a running incusd started by this script or by the package's init
# script, if any.
incusd_pid() {
    local f pid
    for f in "${PIDFILE}" /run/incus.pid; do
        pid=$(cat "${f}" 2>/dev/null) || continue
        if [[ ${pid} =~ ^[0-9]+$ ]] && [[ "$(readlink "/proc/${pid}/exe" 2>/dev/null)" == "${INCUSD}" ]]; then
            echo "${pid}"
            return 0
        fi
    done
    return 1
}

launch_incusd() {
    mkdir -p "$(dirname "${LOG}")"
    log "starting ${INCUSD} --group root (log: ${LOG})"
    # As the package's init script does: PATH from /etc/default/incus (it
    # reaches the helpers in /usr/libexec/incus) and a high open-files limit.
    # setsid + nohup: the daemon outlives this script and its process group;
    # stdin from /dev/null so that it never holds a caller's terminal or pipe.
    (
        PATH="/usr/libexec/incus:/usr/sbin:/usr/bin:/sbin:/bin"
        ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
        exec setsid nohup "${INCUSD}" --group root </dev/null >>"${LOG}" 2>&1
    ) &
    echo $! >"${PIDFILE}"
    log "incusd pid $!"
}

start_daemon() {
    if daemon_answers; then
        log "incus daemon already answering"
        return 0
    fi
    if [[ -d /run/systemd/system ]] && systemctl start incus.socket incus.service 2>/dev/null; then
        log "started incus through systemd"
    fi
    local started=0 pid deadline=$((SECONDS + TIMEOUT))
    until daemon_answers; do
        if pid=$(incusd_pid); then
            # Starting up, or shutting down (then it is restarted once it is gone).
            [[ ${started} -eq 1 ]] || log "incusd (pid ${pid}) runs but does not answer yet; waiting"
        elif [[ -d /run/systemd/system ]] && systemctl -q is-active incus.service 2>/dev/null; then
            : # systemd's incusd, not answering yet
        elif [[ ${started} -eq 0 ]]; then
            launch_incusd
            started=1
        else
            tail -n 30 "${LOG}" >&2 || true
            die "incusd exited (log: ${LOG})"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "${LOG}" >&2 || true
            die "incus daemon did not answer within ${TIMEOUT} s (log: ${LOG})"
        fi
        sleep 0.2
    done
    log "incus daemon answers"
}

# --- 4: storage and profile ---------------------------------------------------

configure() {
    if ! incus storage show default >/dev/null 2>&1; then
        log "creating storage pool default (dir)"
        incus storage create default dir
    fi
    if ! incus profile device get default root pool >/dev/null 2>&1; then
        log "adding root disk to the default profile"
        incus profile device add default root disk path=/ pool=default
    fi
    # incusd downloads cloud instance-type definitions from the public image
    # server at start-up and daily. Only the package mirrors are reachable from
    # the machines this runs on, so point its HTTP(S) proxy at a closed loopback
    # port: the request then fails on this host, with no DNS look-up. Skipped if
    # a proxy is configured already, or with INCUS_SETUP_KEEP_PROXY=1.
    if [[ ${INCUS_SETUP_KEEP_PROXY:-0} != 1 ]] \
        && [[ -z "$(incus config get core.proxy_https)" ]] \
        && [[ -z "$(incus config get core.proxy_http)" ]]; then
        log "setting core.proxy_http(s) to a closed loopback port (no outbound fetches)"
        incus config set core.proxy_https=http://127.0.0.1:9 core.proxy_http=http://127.0.0.1:9
    fi
    # ... but image servers on loopback (the tests' own) are reached directly
    if [[ -z "$(incus config get core.proxy_ignore_hosts)" ]]; then
        incus config set core.proxy_ignore_hosts=127.0.0.1,localhost,::1
    fi
}

# --- 5: the test suite's project, pool and HTTPS listener --------------------------

configure_tests() {
    if ! command -v mkfs.btrfs >/dev/null 2>&1 && grep -qw btrfs /proc/filesystems; then
        log "apt-get install btrfs-progs (the test pool)"
        apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends btrfs-progs
    fi
    if ! incus storage show "${TEST_POOL}" >/dev/null 2>&1; then
        if command -v mkfs.btrfs >/dev/null 2>&1 && grep -qw btrfs /proc/filesystems; then
            log "creating storage pool ${TEST_POOL} (btrfs on a loop file)"
            incus storage create "${TEST_POOL}" btrfs "size=${INCUS_SETUP_POOL_SIZE:-20GiB}"
        else
            log "creating storage pool ${TEST_POOL} (dir: this kernel has no btrfs)"
            incus storage create "${TEST_POOL}" dir
        fi
    fi
    if ! incus project show "${TEST_PROJECT}" >/dev/null 2>&1; then
        log "creating project ${TEST_PROJECT}"
        incus project create "${TEST_PROJECT}" -c features.images=true -c features.profiles=true
    fi
    if ! incus profile device get default root pool --project "${TEST_PROJECT}" >/dev/null 2>&1; then
        incus profile device add default root disk path=/ "pool=${TEST_POOL}" \
            --project "${TEST_PROJECT}"
    fi
    if [[ -z "$(incus config get core.https_address)" ]]; then
        log "listening on https://${HTTPS_ADDRESS} (loopback only)"
        incus config set core.https_address="${HTTPS_ADDRESS}"
    fi
}

install_incus
start_daemon
configure
configure_tests

incus version
