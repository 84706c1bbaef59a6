#!/usr/bin/env bash
# A two-member Incus cluster on this machine, for --incus-target tests (as root).
#
#   bash scripts/incus-cluster.sh up       form it (idempotent: a re-run on a ready cluster
#                                          only checks, in well under a second)
#   bash scripts/incus-cluster.sh status   what runs, and the cluster's members
#   bash scripts/incus-cluster.sh down     stop both members, remove their netns and dirs
#
# The cluster is SEPARATE from the machine's own incusd (/var/lib/incus), which others use:
# nothing here talks to that daemon or changes it. Each member is its own incusd:
#
#   member  INCUS_DIR                netns     address (cluster traffic)
#   m1      /var/lib/pti-cluster/m1  pti-cm1   10.251.77.1:8443
#   m2      /var/lib/pti-cluster/m2  pti-cm2   10.251.77.2:8443
#
# The two network namespaces are joined by one veth pair (pti0 in each); the /24 has no
# route to anywhere else, no NAT, and nothing is added to the host's own namespace but the
# two netns. Clients reach the cluster through m1's unix socket,
# /var/lib/pti-cluster/m1/unix.socket: no host interface at all.
#
# Why nsenter and not `ip netns exec`: `ip netns exec` also unshares the mount namespace and
# mounts a fresh sysfs on /sys, which hides /sys/fs/cgroup (measured here: an empty
# directory), and incusd cannot run containers without it. `nsenter --net=/run/netns/NS`
# enters the network namespace only, so the member shares the host's mounts, as the machine's
# incusd does. INCUS_DIR moves every path of a member (its var, run, log and cache dirs:
# $INCUS_DIR/{run,logs,cache}), so nothing collides with the machine's incusd on disk.
# liblxc names a container's cgroup after the instance (lxc.payload.NAME) whichever daemon
# runs it: instance names in this cluster must not be names the machine's incusd uses (the
# cluster itself keeps names unique across its members).
#
# Member logs: /var/log/incus/pti-cluster-m1.log, -m2.log; pids: /var/lib/pti-cluster/m*.pid.
# Outbound access: none is possible (no route out of the netns); core.proxy_http(s) also point
# at a closed loopback port, as bench/incus_setup.sh does, so a fetch fails at once.
#
# Environment knobs:
#   PTI_CLUSTER_TIMEOUT   seconds to wait for a daemon (default 60)
set -euo pipefail

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

readonly INCUSD=/usr/libexec/incus/incusd
readonly ROOT=/var/lib/pti-cluster
readonly LOGDIR=/var/log/incus
readonly NET=10.251.77
readonly MEMBERS=(m1 m2)
readonly TIMEOUT="${PTI_CLUSTER_TIMEOUT:-60}"

log() { printf 'incus-cluster: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ ${EUID} -eq 0 ]] || die "must run as root"

index() { echo "${1#m}"; }                 # m1 -> 1
netns() { echo "pti-cm$(index "$1")"; }    # m1 -> pti-cm1
mdir() { echo "${ROOT}/$1"; }
pidfile() { echo "${ROOT}/$1.pid"; }
logfile() { echo "${LOGDIR}/pti-cluster-$1.log"; }
address() { echo "${NET}.$(index "$1")"; }

# The incus client for one member, always through that member's own socket: --force-local
# ignores the caller's default remote, INCUS_DIR picks the member's socket. The client runs
# in the member's network namespace too: some commands make connections of their own (a join
# fetches the cluster's certificate from the address in the token), and from the host's
# namespace 10.251.77.x would go out through the default route (met here: the first join
# attempt was answered by something beyond the host, with a foreign certificate). Every call
# has a deadline (CALL_TIMEOUT seconds, default 120), so a member that hangs fails the script.
member_incus() {
    local m=$1
    shift
    timeout "${CALL_TIMEOUT:-120}" nsenter --net="/run/netns/$(netns "${m}")" -- \
        env INCUS_DIR="$(mdir "${m}")" INCUS_SOCKET="$(mdir "${m}")/unix.socket" \
        incus --force-local "$@"
}

# --- network namespaces ---------------------------------------------------------

check_subnet_free() {
    # Refuse a /24 that the host already reaches other than by its default route.
    local routes
    routes=$(ip -4 route show table all match "${NET}.0/24" | grep -v '^default' \
        | grep -v '^local\|^broadcast' || true)
    if [[ -n ${routes} ]]; then
        die "${NET}.0/24 is routed on this host already (${routes}); pick another subnet"
    fi
}

netns_up() {
    local m ns
    for m in "${MEMBERS[@]}"; do
        ns=$(netns "${m}")
        if [[ ! -e /run/netns/${ns} ]]; then
            log "creating netns ${ns}"
            ip netns add "${ns}"
        fi
        ip -n "${ns}" link set lo up
    done
    # One veth pair, made inside pti-cm1 with its peer moved straight to pti-cm2: it never
    # exists in the host's namespace.
    if ! ip -n pti-cm1 link show pti0 >/dev/null 2>&1; then
        log "joining pti-cm1 and pti-cm2 with a veth pair"
        ip -n pti-cm2 link del pti0 2>/dev/null || true
        ip -n pti-cm1 link add pti0 type veth peer name pti0 netns pti-cm2
    fi
    for m in "${MEMBERS[@]}"; do
        ns=$(netns "${m}")
        if ! ip -n "${ns}" -4 addr show dev pti0 | grep -q "inet $(address "${m}")/24"; then
            ip -n "${ns}" addr add "$(address "${m}")/24" dev pti0
        fi
        ip -n "${ns}" link set pti0 up
    done
}

netns_down() {
    local m ns
    for m in "${MEMBERS[@]}"; do
        ns=$(netns "${m}")
        if [[ -e /run/netns/${ns} ]]; then
            log "removing netns ${ns}"
            ip netns del "${ns}"
        fi
    done
}

# --- daemons ------------------------------------------------------------------------

# The pid of member m's incusd, only if the recorded pid is an incusd whose INCUS_DIR is m's
# directory: a stale pid file never makes this script signal an unrelated process.
member_pid() {
    local m=$1 pid
    pid=$(cat "$(pidfile "${m}")" 2>/dev/null) || return 1
    [[ ${pid} =~ ^[0-9]+$ ]] || return 1
    [[ "$(readlink "/proc/${pid}/exe" 2>/dev/null)" == "${INCUSD}" ]] || return 1
    tr '\0' '\n' <"/proc/${pid}/environ" 2>/dev/null | grep -qx "INCUS_DIR=$(mdir "${m}")" \
        || return 1
    echo "${pid}"
}

member_answers() {
    [[ -S "$(mdir "$1")/unix.socket" ]] && CALL_TIMEOUT=10 member_incus "$1" query /1.0 >/dev/null 2>&1
}

launch_member() {
    local m=$1 ns dir
    ns=$(netns "${m}")
    dir=$(mdir "${m}")
    mkdir -p "${dir}" "${LOGDIR}"
    chmod 0711 "${ROOT}" "${dir}"
    log "starting ${m}: incusd in netns ${ns}, INCUS_DIR=${dir} (log: $(logfile "${m}"))"
    # As bench/incus_setup.sh: setsid + nohup so the daemon outlives this script, stdin from
    # /dev/null, the package's PATH and a high open-files limit. nsenter enters only the
    # network namespace and execs incusd, so $! is incusd's own pid.
    (
        exec 9>&- # the script's lock: a daemon that kept it would hold off every later run
        export INCUS_DIR="${dir}"
        PATH="/usr/libexec/incus:/usr/sbin:/usr/bin:/sbin:/bin"
        ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
        exec setsid nohup nsenter --net="/run/netns/${ns}" -- "${INCUSD}" --group root \
            </dev/null >>"$(logfile "${m}")" 2>&1
    ) &
    echo $! >"$(pidfile "${m}")"
}

start_member() {
    local m=$1 started=0 deadline=$((SECONDS + TIMEOUT))
    until member_answers "${m}"; do
        if member_pid "${m}" >/dev/null; then
            : # starting up
        elif [[ ${started} -eq 1 ]] && kill -0 "$(cat "$(pidfile "${m}")")" 2>/dev/null; then
            : # our child, still on its way through setsid and nsenter to incusd
        elif [[ ${started} -eq 0 ]]; then
            launch_member "${m}"
            started=1
        else
            tail -n 30 "$(logfile "${m}")" >&2 || true
            die "incusd of ${m} exited (log: $(logfile "${m}"))"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$(logfile "${m}")" >&2 || true
            die "incusd of ${m} did not answer within ${TIMEOUT} s (log: $(logfile "${m}"))"
        fi
        sleep 0.2
    done
    member_incus "${m}" admin waitready --timeout="${TIMEOUT}"
}

clustered() {
    [[ "$(member_incus "$1" query /1.0/cluster 2>/dev/null | jq -r .enabled)" == "true" ]]
}

# --- the cluster ----------------------------------------------------------------------

bootstrap_m1() {
    if clustered m1; then
        return 0
    fi
    log "bootstrapping the cluster on m1 ($(address m1):8443)"
    member_incus m1 admin init --preseed <<EOF
config:
  core.https_address: $(address m1):8443
  core.proxy_http: http://127.0.0.1:9
  core.proxy_https: http://127.0.0.1:9
  images.auto_update_interval: 0
storage_pools:
- name: default
  driver: dir
profiles:
- name: default
  devices:
    root:
      path: /
      pool: default
      type: disk
cluster:
  server_name: m1
  enabled: true
EOF
}

# The sha256 of the certificate that m1's cluster address serves, as m2 sees it.
served_fingerprint() {
    echo | timeout 5 nsenter --net=/run/netns/pti-cm2 \
        openssl s_client -connect "$(address m1):8443" 2>/dev/null \
        | openssl x509 -outform DER 2>/dev/null | sha256sum | cut -d' ' -f1
}

# Enabling clustering gives m1 a new certificate (cluster.crt) and restarts its listener; a
# join in that window fails with "Certificate fingerprint mismatch between join token and
# cluster member" (met here on the first try). So wait until the cluster certificate is what
# m2 is served.
wait_cluster_certificate() {
    local want deadline=$((SECONDS + TIMEOUT))
    want=$(openssl x509 -in "$(mdir m1)/cluster.crt" -outform DER | sha256sum | cut -d' ' -f1)
    until [[ "$(served_fingerprint)" == "${want}" ]]; do
        ((SECONDS < deadline)) || die "m1 does not serve its cluster certificate on $(address m1):8443"
        sleep 0.1
    done
}

join_m2() {
    if clustered m2; then
        return 0
    fi
    wait_cluster_certificate
    log "joining m2 ($(address m2):8443) to the cluster"
    # A token left by an earlier attempt that failed half way is revoked first: m1 refuses
    # a second token for the same name.
    member_incus m1 cluster revoke-token m2 >/dev/null 2>&1 || true
    local token
    token=$(member_incus m1 cluster add m2 --quiet)
    # The member's own part of the cluster-wide pool: an empty source is the default
    # directory, $INCUS_DIR/storage-pools/default, under m2's own INCUS_DIR.
    # cluster_address and cluster_certificate given: the client then needs no connection to
    # learn them (the daemon checks the certificate against the token's fingerprint).
    member_incus m2 admin init --preseed <<EOF
cluster:
  enabled: true
  server_name: m2
  server_address: $(address m2):8443
  cluster_address: $(address m1):8443
  cluster_certificate: |
$(sed 's/^/    /' "$(mdir m1)/cluster.crt")
  cluster_token: ${token}
  member_config:
  - entity: storage-pool
    name: default
    key: source
    value: ""
EOF
}

check_cluster() {
    local members
    members=$(member_incus m1 query /1.0/cluster/members?recursion=1 \
        | jq -r '[.[] | select(.status == "Online") | .server_name] | sort | join(",")')
    [[ ${members} == "m1,m2" ]] || die "cluster members online: '${members}', expected m1,m2"
}

# --- stopping -----------------------------------------------------------------------

# Delete what is left in the cluster (it is this script's own: nobody else's instances live
# there), so that no container outlives its daemon with mounts under the member's dir.
empty_cluster() {
    member_answers m1 || return 0
    local name project
    while IFS=$'\t' read -r project name; do
        [[ -n ${name} ]] || continue
        log "deleting leftover instance ${name} (project ${project})"
        CALL_TIMEOUT=60 member_incus m1 delete --force --project "${project}" "${name}" || true
    done < <(member_incus m1 query "/1.0/instances?recursion=1&all-projects=true" 2>/dev/null \
        | jq -r '.[] | [.project, .name] | @tsv')
}

stop_member() {
    local m=$1 pid deadline
    pid=$(member_pid "${m}") || { log "${m}: no incusd of ours runs"; return 0; }
    log "stopping ${m} (incusd pid ${pid})"
    # `admin shutdown` stops the member's instances and exits; signals only if it hangs.
    CALL_TIMEOUT=60 member_incus "${m}" admin shutdown >/dev/null 2>&1 || true
    deadline=$((SECONDS + 30))
    while [[ -e /proc/${pid} ]] && member_pid "${m}" >/dev/null; do
        if ((SECONDS >= deadline)); then
            log "${m}: incusd ${pid} still runs after shutdown; SIGKILL"
            kill -KILL "${pid}" 2>/dev/null || true
            break
        fi
        if ((SECONDS + 20 == deadline)); then
            kill -TERM "${pid}" 2>/dev/null || true
        fi
        sleep 0.2
    done
    rm -f "$(pidfile "${m}")"
}

# Unmount what the members left mounted under ROOT (shmounts, guestapi, ...), deepest first,
# and refuse to remove anything while a mount remains: rm must never cross into one.
unmount_all() {
    local mnt
    while read -r mnt; do
        log "unmounting ${mnt}"
        umount -l "${mnt}" || true
    done < <(awk -v root="${ROOT}/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo \
        | sort -r)
    if awk -v root="${ROOT}/" 'index($5, root) == 1 { found = 1 } END { exit !found }' \
        /proc/self/mountinfo; then
        die "mounts remain under ${ROOT}; not removing it"
    fi
}

# --- commands -----------------------------------------------------------------------

cmd_up() {
    local start=${SECONDS} m
    command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
    [[ -x ${INCUSD} ]] || die "${INCUSD} is missing: run bash bench/incus_setup.sh first"
    check_subnet_free
    mkdir -p "${ROOT}"
    netns_up
    for m in "${MEMBERS[@]}"; do
        start_member "${m}"
    done
    bootstrap_m1
    join_m2
    check_cluster
    log "cluster m1,m2 ready in $((SECONDS - start)) s; socket $(mdir m1)/unix.socket"
}

cmd_down() {
    empty_cluster
    # m2 first: a member that stops needs the database, which m1 (the only voter) holds.
    stop_member m2
    stop_member m1
    if [[ -d ${ROOT} ]]; then
        unmount_all
        local m
        for m in "${MEMBERS[@]}"; do
            if member_pid "${m}" >/dev/null; then
                die "${m} still runs; not removing $(mdir "${m}")"
            fi
            rm -rf --one-file-system "$(mdir "${m}")"
        done
        rmdir "${ROOT}" 2>/dev/null || true
    fi
    netns_down
    log "cluster down"
}

cmd_status() {
    local m pid rc=0
    for m in "${MEMBERS[@]}"; do
        pid=$(member_pid "${m}" || echo -)
        if member_answers "${m}"; then
            printf '%s: netns %s, incusd pid %s, answers\n' "${m}" "$(netns "${m}")" "${pid}"
        else
            printf '%s: netns %s, incusd pid %s, not answering\n' "${m}" "$(netns "${m}")" "${pid}"
            rc=1
        fi
    done
    if member_answers m1; then
        member_incus m1 cluster list -f csv -c nus 2>/dev/null || rc=1
    fi
    return "${rc}"
}

# One invocation at a time (a test session's `up` racing another's `down` would leave half a
# cluster). The lock lives outside ROOT, which `down` removes.
exec 9>/run/lock/pti-cluster-script.lock
flock -w "${TIMEOUT}" 9 || die "another incus-cluster.sh still runs after ${TIMEOUT} s"

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*) die "usage: $0 up|down|status" ;;
esac
