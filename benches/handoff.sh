#!/usr/bin/env bash
# benches/handoff.sh: load benchmark of baton's connection handoff (BATON_HANDOFF=on)
# against plain proxying (BATON_HANDOFF=off) and against no frontend at all (direct),
# over veth pairs between network namespaces on one bridge (one L2 segment).
#
#   client ns --veth--+                  +--veth-- fe ns: baton :15006 (admin 127.0.0.1:15021,
#                     |-- bridge ns br0 -|                  handoff receiver :15010 when on)
#                     |                  +--veth-- be ns: nginx 0.0.0.0:8080 serving /1k /64k /1m
#                                                          baton, handoff receiver :15010 -> 127.0.0.1:8080
#
# Targets: direct   = client -> be nginx :8080
#          proxy    = client -> fe baton :15006, BATON_HANDOFF=off (fe proxies to be nginx)
#          handoff  = client -> fe baton :15006, BATON_HANDOFF=on, BATON_HANDOFF_MIN_BYTES=0
#                     (always, whatever the caller's environment says): fe hands every
#                     eligible client TCP connection to be's baton, which serves it from
#                     nginx; the response goes be -> client without fe. The mechanism.
#          policy   = client -> fe baton :15006, BATON_HANDOFF=on with the size policy
#                     (BATON_HANDOFF_MIN_BYTES from the caller's environment, else the
#                     default 32768): fe hands off only requests whose response it expects
#                     to be that large, learned per path from the responses it proxies (a
#                     path's first request is proxied and measured; 1 in 64 expected-large
#                     ones are proxied again as a sample). The learned sizes start empty
#                     at every fe restart, so the warm-up teaches them.
# APP=pass swaps be's application for baton-pass-app (src/bin/baton-pass-app.rs, the
# reference handoff-aware application, one thread like nginx's one worker), serving the
# same files on :8080, and runs the be baton with BATON_APP_PASS: moved connections'
# sockets go to the application itself (SCM_RIGHTS) and the be baton leaves the data
# path too. Every target (direct included) then measures that application.
# Connection modes: keepalive (plain wrk: a connection is handed off once, at its first
# request, and then served by the be baton) and close (wrk -H 'Connection: close': every
# request is a new connection and so a new handoff).
#
# For each size it makes RUNS rounds (3 by default); each round runs every target and
# connection mode once (targets interleaved): warm-up, throughput (wrk -t2 -c32 -d8s),
# latency (wrk -t1 -c1 -d4s --latency), then a first-request probe per target (PROBES
# new connections one at a time, PROBE_RATE/s, timed by a Python client). The fe baton
# is restarted when the target switches between proxy, handoff and policy. It measures
# the fe baton's CPU seconds per 10k requests (and the be baton's, for handoff and
# policy), and from the fe's /metrics the deltas of baton_handoffs_total,
# baton_handoff_fallbacks_total, baton_handoff_skipped_total (policy) and the
# baton_handoff_duration_seconds histogram (freeze -> "go"). It stops if a baton's
# socket destruction watch ends (close notices stop: later numbers would be wrong). If
# the fe baton cannot bind its port at a restart (EADDRINUSE from the TIME_WAIT of
# sockets that went through TCP_REPAIR: a baton bug), it waits up to 90 s and says so.
# Results are printed and written to the "## Handoff mode (benches/handoff.sh)" section
# of benches/RESULTS.md (other sections are kept; so is a "### Analysis" subsection of
# the old section).
#
# Run as root:  sudo benches/handoff.sh        smoke test:  sudo QUICK=1 benches/handoff.sh
# Environment (defaults in brackets):
#   RUNS [3]  DURATION [8]  LAT_DURATION [4]  WARMUP [2]  WRK_THREADS [2]  WRK_CONNS [32]
#   APP [nginx]  (nginx | pass: the be application, see above; APP=pass results go to the
#                section "## Handoff mode, handoff-aware application (benches/handoff.sh APP=pass)")
#   SIZES ["1k 64k 1m"]  TARGETS ["direct proxy handoff policy"]  CONN_MODES ["keepalive close"]
#   PROBES [200]  PROBE_RATE [100]  (first-request probes per target and run; 0 = none)
#   QUICK [0]  (1: RUNS=1 DURATION=2 LAT_DURATION=2 WARMUP=1 PROBES=50 unless set)
#   PIN [1]  CLIENT_CPUS [0]  SERVER_CPUS [1]  (taskset: wrk on CLIENT_CPUS; fe baton, be
#            baton and be nginx on SERVER_CPUS; PIN=0 leaves scheduling to the kernel)
#   RESULTS [benches/RESULTS.md]  WRITE_RESULTS [1]  NOFILE [65536]  SUBNET [10.98.0]
#   BATON_BIN [target/release/baton, built with cargo build --release]  SKIP_BUILD [0]
#   BATON_LOG [warn]  RAW_DIR [unset]  (a directory to copy raw wrk outputs, logs and
#   /metrics scrapes into; with BATON_LOG=info the batons' logs show every handoff)
#   Any other BATON_* variable in the environment is passed to both batons unchanged,
#   except that the handoff target always runs the fe with BATON_HANDOFF_MIN_BYTES=0;
#   BATON_HANDOFF_MIN_BYTES [unset: baton's default, 32768] is the policy target's.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$BENCH_DIR/lib.sh"
ROOT=$(cd "$BENCH_DIR/.." && pwd)

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    def_runs=1 def_dur=2 def_lat=2 def_warm=1 def_probes=50
else
    def_runs=3 def_dur=8 def_lat=4 def_warm=2 def_probes=200
fi
RUNS=${RUNS:-$def_runs}
DURATION=${DURATION:-$def_dur}
LAT_DURATION=${LAT_DURATION:-$def_lat}
WARMUP=${WARMUP:-$def_warm}
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-32}
SIZES=${SIZES:-1k 64k 1m}
TARGETS=${TARGETS:-direct proxy handoff policy}
CONN_MODES=${CONN_MODES:-keepalive close}
PROBES=${PROBES:-$def_probes}
PROBE_RATE=${PROBE_RATE:-100}
PIN=${PIN:-1}
CLIENT_CPUS=${CLIENT_CPUS:-0}
SERVER_CPUS=${SERVER_CPUS:-1}
NOFILE=${NOFILE:-65536}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
WRITE_RESULTS=${WRITE_RESULTS:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
if [[ -n ${BATON_BIN:-} ]]; then SKIP_BUILD=1; fi
BATON_BIN=${BATON_BIN:-$ROOT/target/release/baton}
SUBNET=${SUBNET:-10.98.0}
RAW_DIR=${RAW_DIR:-}
LOG_LEVEL=${BATON_LOG:-warn}
APP=${APP:-nginx}
[[ $APP == nginx || $APP == pass ]] || die "APP must be nginx or pass (got '$APP')"
PASS_APP_BIN=$(dirname "$BATON_BIN")/baton-pass-app
if [[ $APP == pass ]]; then APP_NAME=baton-pass-app; else APP_NAME=nginx; fi

SECTION_TITLE='## Handoff mode (benches/handoff.sh)'
[[ $APP == pass ]] && SECTION_TITLE='## Handoff mode, handoff-aware application (benches/handoff.sh APP=pass)'
INSERT_BEFORE='## In-process stack'
# The generated part of the section lies between these two lines; everything after
# GEN_END up to the next "## " heading (the "### Analysis" subsection) is hand-written
# and kept as it is.
GEN_BEGIN='<!-- generated by benches/handoff.sh: rerunning it replaces everything up to the end marker -->'
GEN_END='<!-- end of the generated part: what follows is written by hand and kept -->'
BACKEND_PORT=8080
BATON_PORT=15006
ADMIN_PORT=15021
C_IP=$SUBNET.1
FE_IP=$SUBNET.2
BE_IP=$SUBNET.3

declare -A SIZE_BYTES=([1k]=1024 [64k]=65536 [1m]=1048576)
declare -A SIZE_LABEL=([1k]="1 KiB" [64k]="64 KiB" [1m]="1 MiB")
# The order in a round: direct between handoff and proxy (the fe restart after the
# handoff runs, whose fallbacks may leave TIME_WAITs on the port, comes after a pause).
ALL_TARGETS="proxy policy handoff direct"
DISPLAY_TARGETS="direct proxy handoff policy"
ALL_CONN_MODES="keepalive close"
declare -A CONN_LABEL=([keepalive]="keep-alive" [close]="Connection: close")
declare -A TARGET_URL=(
    [direct]="http://$BE_IP:$BACKEND_PORT"
    [proxy]="http://$FE_IP:$BATON_PORT"
    [handoff]="http://$FE_IP:$BATON_PORT"
    [policy]="http://$FE_IP:$BATON_PORT"
)

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
# is_handoff_target TARGET: the fe baton runs with BATON_HANDOFF=on (handoff, policy).
is_handoff_target() { [[ $1 == handoff || $1 == policy ]]; }
has_handoff_target() { has_target handoff || has_target policy; }

# ---------------------------------------------------------------- checks
[[ $(id -u) == 0 ]] || die "must run as root (it creates network namespaces): sudo $0"
missing=()
for cmd in ip nft nginx wrk python3 curl getconf awk pgrep sysctl cmp git taskset; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
((${#missing[@]} == 0)) ||
    die "missing commands: ${missing[*]}. Install: apt-get install -y nginx wrk iproute2 nftables python3 curl procps util-linux git diffutils"
for s in $SIZES; do [[ -n ${SIZE_BYTES[$s]:-} ]] || die "unknown size '$s' in SIZES (known: 1k 64k 1m)"; done
for t in $TARGETS; do [[ " $ALL_TARGETS " == *" $t "* ]] || die "unknown target '$t' in TARGETS (known: $ALL_TARGETS)"; done
for c in $CONN_MODES; do [[ " $ALL_CONN_MODES " == *" $c "* ]] || die "unknown mode '$c' in CONN_MODES (known: $ALL_CONN_MODES)"; done
[[ -n ${SIZES// /} && -n ${TARGETS// /} && -n ${CONN_MODES// /} ]] || die "SIZES, TARGETS and CONN_MODES must not be empty"
for v in RUNS DURATION LAT_DURATION WARMUP WRK_THREADS WRK_CONNS NOFILE PROBES PROBE_RATE; do
    is_uint "${!v}" || die "$v must be a non-negative integer (got '${!v}')"
done
((RUNS > 0 && DURATION > 0 && LAT_DURATION > 0 && PROBE_RATE > 0)) || die "RUNS, DURATION, LAT_DURATION and PROBE_RATE must be > 0"
[[ $SUBNET =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "SUBNET must look like 10.X.Y (a /24 inside 10.0.0.0/8)"
if [[ $PIN == 1 ]]; then
    (($(nproc) >= 2)) || { PIN=0; log "only one CPU: not pinning"; }
fi
CLK_TCK=$(getconf CLK_TCK)
PYTHON=$(python3 -c 'import sys; print(sys.executable)') # the real interpreter, not a shim
if [[ -n $RAW_DIR ]]; then mkdir -p "$RAW_DIR" || die "cannot create RAW_DIR=$RAW_DIR"; fi

# pin CPUS: the taskset prefix for a command (empty without pinning); taskset execs the
# command, so the PID we record is still the command's own.
CLIENT_PIN=() SERVER_PIN=()
if [[ $PIN == 1 ]]; then
    CLIENT_PIN=(taskset -c "$CLIENT_CPUS")
    SERVER_PIN=(taskset -c "$SERVER_CPUS")
fi

# ---------------------------------------------------------------- build baton
if has_target proxy || has_handoff_target; then
    if [[ $SKIP_BUILD != 1 ]]; then
        if command -v cargo >/dev/null 2>&1; then
            log "building baton: cargo build --release --bin baton --bin baton-pass-app"
            (cd "$ROOT" && cargo build --release --bin baton --bin baton-pass-app) || die "cargo build --release failed"
        elif [[ -x $BATON_BIN ]]; then
            note "cargo not in PATH: using the existing $BATON_BIN, which may be older than HEAD"
        fi
    fi
fi
[[ -x $BATON_BIN ]] || die "baton binary not found at $BATON_BIN (cd $ROOT && cargo build --release)"
[[ $APP != pass || -x $PASS_APP_BIN ]] || die "APP=pass: baton-pass-app not found at $PASS_APP_BIN (cd $ROOT && cargo build --release)"
# The source the binary was built from, as of now (the build).
commit=$(git -c safe.directory="$ROOT" -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -c safe.directory="$ROOT" -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | awk '{ print $NF }' | tr '\n' ' ')
if [[ -n $dirty ]]; then
    commit="$commit (working tree has uncommitted changes: ${dirty% })"
fi

# ---------------------------------------------------------------- open-file limit
if ! ulimit -n "$NOFILE" 2>/dev/null; then
    ulimit -Sn "$(ulimit -Hn)"
    log "could not raise the open-file limit to $NOFILE; using the hard limit $(ulimit -n)"
fi
NOFILE_EFF=$(ulimit -n)
[[ $NOFILE_EFF == unlimited ]] && NOFILE_EFF=1048576
BACKEND_CONNS=$((NOFILE_EFF - 256 < 16384 ? NOFILE_EFF - 256 : 16384))

# ---------------------------------------------------------------- cleanup (always)
ID=$$
NS_S="baton-handoff-$ID-switch"
NS_C="baton-handoff-$ID-client"
NS_F="baton-handoff-$ID-fe"
NS_B="baton-handoff-$ID-be"
ALL_NS="$NS_S $NS_C $NS_F $NS_B"
TMP=""
PIDS=() # every process we started and have not reaped yet

cleanup() {
    local rc=$? pid ns
    set +e
    trap '' INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do stop_pid "$pid" 5; done
    for ns in $ALL_NS; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    if [[ -n $RAW_DIR && -n $TMP && -d $TMP ]]; then
        cp "$TMP"/*.log "$TMP"/*.txt "$RAW_DIR"/ 2>/dev/null
        log "raw outputs, logs and /metrics scrapes copied to $RAW_DIR"
    fi
    [[ -n $TMP && -d $TMP ]] && rm -rf -- "$TMP"
    if ((rc != 0)); then log "failed (exit $rc); namespaces, processes and temp files cleaned up"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TMP=$(mktemp -d /tmp/baton-handoff.XXXXXX)
chmod 0755 "$TMP" # nginx workers run as nobody and must read the files
# Run a copy: the fe baton is restarted many times, and a rebuild of BATON_BIN meanwhile
# must not change what is measured.
cp "$BATON_BIN" "$TMP/baton"
[[ $APP == pass ]] && cp "$PASS_APP_BIN" "$TMP/baton-pass-app"
BATON_RUN=$TMP/baton
BATON_BUILT=$(date -u -r "$BATON_BIN" '+%Y-%m-%d %H:%M UTC')
BATON_SHA=$(sha256sum "$BATON_RUN" | cut -c1-12)

# start_in NS NAME CMD...: run CMD in namespace NS in the background, log appended to
# $TMP/NAME.log; its PID (ip netns exec and taskset exec the command) goes to LAST_PID.
start_in() {
    local ns=$1 name=$2
    shift 2
    echo "=== $(date +%T) start: $*" >>"$TMP/$name.log"
    ip netns exec "$ns" "$@" >>"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}
# run_client OUT CMD...: run CMD in the client namespace (pinned) with output to OUT and
# wait for it, in the background so that a signal to this script interrupts the wait.
run_client() {
    local out=$1 pid rc=0
    shift
    ip netns exec "$NS_C" "${CLIENT_PIN[@]}" "$@" >"$out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    untrack "$pid"
    return "$rc"
}
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "" || v == "NaN") print "n/a"; else printf f, v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "NaN" || b == "NaN" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }

# ---------------------------------------------------------------- metrics
# scrape NS OUT: the baton /metrics of namespace NS (admin on 127.0.0.1) into OUT.
scrape() {
    ip netns exec "$1" curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$2" ||
        die "cannot scrape /metrics in $1"
}
# msum FILE NAME: the sum of every sample of metric NAME (all label sets); 0 if none.
msum() {
    awk -v m="$2" '$1 !~ /^#/ { n = $1; sub(/\{.*/, "", n); if (n == m) s += $NF } END { printf "%d\n", s }' "$1"
}
# mdelta BEFORE AFTER NAME: msum(AFTER) - msum(BEFORE).
mdelta() { echo $(($(msum "$2" "$3") - $(msum "$1" "$3"))); }
# labeled_deltas BEFORE AFTER NAME: "label=delta, ..." for the label sets whose value changed.
labeled_deltas() {
    awk -v m="$3" '
        $1 ~ /^#/ { next }
        { n = $1; sub(/\{.*/, "", n); if (n != m) next
          l = $1; sub(/^[^{]*\{/, "", l); sub(/\}$/, "", l); sub(/^[a-z_]+="/, "", l); sub(/"$/, "", l)
          if (FILENAME == ARGV[1]) b[l] = $NF; else { a[l] = $NF; if (!(l in seen)) { seen[l] = 1; order[++k] = l } } }
        END { for (i = 1; i <= k; i++) { d = a[order[i]] - b[order[i]]; if (d != 0) { s = s sep order[i] "=" d; sep = ", " } } print s }' "$1" "$2"
}
# sum_labeled: the label-wise sum of the labeled_deltas lines on stdin ("a=1, b=2" and
# "b=3" give "a=1, b=5"), in the order the labels first appear.
sum_labeled() {
    tr ',' '\n' | awk -F= 'NF == 2 { gsub(/ /, "", $1); if (!($1 in n)) o[++k] = $1; n[$1] += $2 }
        END { for (i = 1; i <= k; i++) { s = s sep o[i] "=" n[o[i]]; sep = ", " } print s }'
}
# hist BEFORE AFTER: "le:delta le:delta ..." of baton_handoff_duration_seconds_bucket
# (cumulative counts, in the order /metrics lists them; the last le is +Inf).
hist() {
    awk '
        $1 ~ /^baton_handoff_duration_seconds_bucket\{/ {
            l = $1; sub(/.*le="/, "", l); sub(/".*/, "", l)
            if (FILENAME == ARGV[1]) b[l] = $NF; else { a[l] = $NF; order[++k] = l } }
        END { for (i = 1; i <= k; i++) { s = s sep order[i] ":" (a[order[i]] - b[order[i]]); sep = " " } print s }' "$1" "$2"
}
# hist_add H1 H2: the bucket-wise sum of two hist strings (either may be empty).
hist_add() {
    [[ -n $1 ]] || { echo "$2"; return; }
    [[ -n $2 ]] || { echo "$1"; return; }
    awk -v x="$1" -v y="$2" 'BEGIN { n = split(x, a, " "); split(y, b, " ")
        for (i = 1; i <= n; i++) { split(a[i], p, ":"); split(b[i], q, ":"); s = s sep p[1] ":" (p[2] + q[2]); sep = " " } print s }'
}
# hist_count H: the number of observations (the +Inf bucket).
hist_count() { awk -v x="$1" 'BEGIN { n = split(x, a, " "); if (n == 0) { print 0; exit } split(a[n], p, ":"); print p[2] + 0 }'; }
# hist_pct H PCT: the upper bound of the bucket holding the PCT-th percentile, as text.
hist_pct() {
    awk -v x="$1" -v pct="$2" 'BEGIN {
        n = split(x, a, " "); split(a[n], p, ":"); total = p[2] + 0
        if (total == 0) { print "n/a"; exit }
        prev = ""
        for (i = 1; i <= n; i++) {
            split(a[i], p, ":")
            if (p[2] >= pct / 100 * total) {
                if (p[1] == "+Inf") { printf "> %s\n", prev; exit }
                us = p[1] * 1e6
                if (us >= 1000) printf "≤ %g ms\n", us / 1000; else printf "≤ %g µs\n", us
                exit }
            us = p[1] * 1e6; prev = (us >= 1000) ? sprintf("%g ms", us / 1000) : sprintf("%g µs", us)
        }
        print "n/a" }'
}
# hist_pct_us H PCT: the same bound as a number of µs (1e9 for +Inf, NaN if empty).
hist_pct_us() {
    awk -v x="$1" -v pct="$2" 'BEGIN {
        n = split(x, a, " "); split(a[n], p, ":"); total = p[2] + 0
        if (total == 0) { print "NaN"; exit }
        for (i = 1; i <= n; i++) { split(a[i], p, ":")
            if (p[2] >= pct / 100 * total) { if (p[1] == "+Inf") print 1e9; else printf "%g\n", p[1] * 1e6; exit } }
        print "NaN" }'
}
# nft_count NS KIND NAME: elements in set/map NAME of table netdev baton in NS (empty if none).
nft_count() {
    ip netns exec "$1" nft -j list "$2" netdev baton "$3" 2>/dev/null |
        python3 -c 'import json, sys
d = json.load(sys.stdin)
print(sum(len(o[k].get("elem", [])) for o in d["nftables"] for k in ("set", "map") if k in o))' 2>/dev/null || true
}

# state_dump WHY: kernel state of the namespaces (TCP counters, socket summary, handoff
# table sizes) to stderr and $TMP/state-N.txt, when a wrk run fails.
DUMPS=0
state_dump() {
    local ns f
    DUMPS=$((DUMPS + 1))
    f="$TMP/state-$DUMPS.txt"
    {
        echo "=== state dump: $1 ($(date +%T))"
        for ns in $NS_C $NS_F $NS_B; do
            echo "--- $ns: ss -s"
            ip netns exec "$ns" ss -s 2>&1 | head -n 8
            echo "--- $ns: nonzero TCP/IP error counters (nstat -az, since namespace creation)"
            ip netns exec "$ns" nstat -az 2>/dev/null |
                awk '$2 != 0 && $1 ~ /(Drop|Overflow|Fail|Reset|Retrans|Timeout|Abort|Challenge|TW|Paws|Reject|Err)/ { print "  " $1, $2 }'
        done
        echo "--- fe table: held $(nft_count "$NS_F" set held), moved $(nft_count "$NS_F" map moved); be table: restored $(nft_count "$NS_B" set restored)"
    } >"$f" 2>&1
    cat "$f" >&2
}

# ---------------------------------------------------------------- topology
log "creating namespaces $ALL_NS (client $C_IP, fe $FE_IP, be $BE_IP)"
for ns in $ALL_NS; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.tcp_congestion_control=reno ||
        die "cannot set tcp_congestion_control=reno in $ns"
done
for k in iptables ip6tables arptables; do
    ip netns exec "$NS_S" sysctl -qw "net.bridge.bridge-nf-call-$k=0" 2>/dev/null || true
done
ip -n "$NS_S" link add br0 type bridge
ip -n "$NS_S" link set br0 up
i=1
for ns in $NS_C $NS_F $NS_B; do
    ip -n "$NS_S" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$NS_S" link set "v$i" master br0 up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    i=$((i + 1))
done
ip netns exec "$NS_C" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"

# ---------------------------------------------------------------- be: nginx with static files
mkdir -p "$TMP/www" "$TMP/backend"
for s in 1k 64k 1m; do head -c "${SIZE_BYTES[$s]}" /dev/urandom >"$TMP/www/$s"; done
chmod 0755 "$TMP/www" && chmod 0644 "$TMP/www"/*
KEY=$TMP/key
(umask 077 && head -c 32 /dev/urandom | base64 >"$KEY")

cat >"$TMP/backend/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE_EFF;
pid $TMP/backend/nginx.pid;
error_log $TMP/backend/error.log warn;
events { worker_connections $BACKEND_CONNS; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    client_body_temp_path $TMP/backend/client_body;
    proxy_temp_path $TMP/backend/proxy;
    fastcgi_temp_path $TMP/backend/fastcgi;
    uwsgi_temp_path $TMP/backend/uwsgi;
    scgi_temp_path $TMP/backend/scgi;
    server {
        listen 0.0.0.0:$BACKEND_PORT backlog=4096;
        root $TMP/www;
        location / { }
    }
}
EOF
NGINX_ARGS=(-p "$TMP/backend/" -c "$TMP/backend/nginx.conf" -e "$TMP/backend/error.log")

# The first-request probe: N new connections one after the other, at most RATE a second,
# each one keep-alive "GET PATH" (so handoff mode moves it: each probe is one
# uncontended handoff), closed by the client once the body is in. Prints one line per
# request: the time from connect() to the last byte of the body in µs, or "error ..."
# (bad status or length, socket error).
cat >"$TMP/probe.py" <<'PY'
import socket, sys, time

host, port, path, n, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
interval = 1.0 / rate
due = time.monotonic()
for _ in range(n):
    wait = due - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    due = max(due + interval, time.monotonic())
    try:
        t0 = time.perf_counter()
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(req)
        buf = b""
        while b"\r\n\r\n" not in buf:
            b = s.recv(65536)
            if not b:
                raise OSError("closed before the response head")
            buf += b
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = lines[0].split()[1]
        length = next(int(l.split(b":", 1)[1]) for l in lines[1:] if l.lower().startswith(b"content-length:"))
        got = len(body)
        while got < length:
            b = s.recv(262144)
            if not b:
                raise OSError(f"closed after {got} of {length} body bytes")
            got += len(b)
        t1 = time.perf_counter()
        s.close()
        if status != b"200" or got != length:
            print(f"error status {status.decode()} body {got}/{length}", flush=True)
        else:
            print(f"{(t1 - t0) * 1e6:.1f}", flush=True)
    except Exception as e:
        print(f"error {type(e).__name__}: {e}", flush=True)
PY
ip netns exec "$NS_B" nginx "${NGINX_ARGS[@]}" -t -q >"$TMP/nginx-test.log" 2>&1 ||
    { cat "$TMP/nginx-test.log" >&2; die "nginx config is invalid"; }

APP_SOCK=$TMP/app.sock
if [[ $APP == pass ]]; then
    log "starting be baton-pass-app on 0.0.0.0:$BACKEND_PORT, taking passed connections on $APP_SOCK"
    start_in "$NS_B" app "${SERVER_PIN[@]}" "$TMP/baton-pass-app" --root "$TMP/www" \
        --listen "0.0.0.0:$BACKEND_PORT" --pass "$APP_SOCK" --name be
else
    log "starting be nginx on 0.0.0.0:$BACKEND_PORT (worker_processes 1)"
    start_in "$NS_B" app "${SERVER_PIN[@]}" nginx "${NGINX_ARGS[@]}" -g 'daemon off;'
fi
APP_PID=$LAST_PID
wait_until 10 app "$APP_PID" ip netns exec "$NS_C" curl -sf -o /dev/null --max-time 1 "${TARGET_URL[direct]}/1k"

# ---------------------------------------------------------------- batons
# Any BATON_* variable of the caller's environment passes through (the ones set here win).
BATON_COMMON=(
    BATON_INBOUND_ADDR="0.0.0.0:$BATON_PORT"
    BATON_ADMIN_ADDR="127.0.0.1:$ADMIN_PORT"
    BATON_WORKERS=1
    BATON_LOG="$LOG_LEVEL"
    BATON_HANDOFF_INTERFACE=eth0
    BATON_HANDOFF_KEY_FILE="$KEY"
)
admin_ready() { ip netns exec "$1" curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$ADMIN_PORT/ready"; }
# handoff_enabled NS: baton_handoff_enabled of the baton in NS.
handoff_enabled() {
    scrape "$1" "$TMP/enabled.txt"
    msum "$TMP/enabled.txt" baton_handoff_enabled
}

BE_ENV=(BATON_HANDOFF=on BATON_APP_ADDR="127.0.0.1:$BACKEND_PORT")
[[ $APP == pass ]] && BE_ENV+=(BATON_APP_PASS="$APP_SOCK")
log "starting be baton (handoff receiver, app 127.0.0.1:$BACKEND_PORT$([[ $APP == pass ]] && echo ", passing to $APP_SOCK"))"
start_in "$NS_B" be-baton env -u BATON_BIN "${BATON_COMMON[@]}" "${BE_ENV[@]}" \
    "${SERVER_PIN[@]}" "$BATON_RUN"
BE_PID=$LAST_PID
wait_until 20 be-baton "$BE_PID" admin_ready "$NS_B"
[[ $(handoff_enabled "$NS_B") == 1 ]] || { show_log be-baton; die "be baton: baton_handoff_enabled is not 1 (see its log above)"; }

FE_PID="" FE_MODE=""
FE_STARTS=0
# fe_start MODE (proxy | handoff | policy): (re)start the fe baton with BATON_HANDOFF=off
# (proxy) or on (handoff: with BATON_HANDOFF_MIN_BYTES=0, every eligible request handed
# off; policy: the caller's BATON_HANDOFF_MIN_BYTES, which passes through, or baton's
# default).
fe_start() {
    local mode=$1 stale fe_env=(BATON_HANDOFF=off)
    [[ $FE_MODE == "$mode" ]] && return 0
    if [[ -n $FE_PID ]]; then
        stop_pid "$FE_PID" 10
        [[ $STOP_RC == 0 ]] || { note "fe baton ($FE_MODE) did not exit 0 on SIGTERM (exit: $STOP_RC)"; show_log fe-baton; }
        FE_PID=""
        # What is left on the inbound port (in the log, for when the next bind fails).
        {
            echo "=== $(date +%T) sockets on :$BATON_PORT after the fe baton exited (state count):"
            ip netns exec "$NS_F" ss -Htan "( sport = :$BATON_PORT )" | awk '{ print $1 }' | sort | uniq -c
        } >>"$TMP/fe-baton.log" 2>&1
    fi
    if is_handoff_target "$FE_MODE"; then
        # The handoff baton leaves its netdev table behind (by design: moved connections
        # outlive a restart). Redirects still in it now were never removed by a close
        # notice; count them, then drop the table so that proxy mode runs without the
        # ingress hook (and the next handoff baton starts from an empty one).
        stale=$(nft_count "$NS_F" map moved)
        [[ -z $stale || $stale == 0 ]] || note "fe: $stale redirect(s) left in the 'moved' map after the $FE_MODE runs (close notices missing)"
        ip netns exec "$NS_F" nft delete table netdev baton 2>/dev/null || true
    fi
    is_handoff_target "$mode" && fe_env=(BATON_HANDOFF=on)
    [[ $mode == handoff ]] && fe_env+=(BATON_HANDOFF_MIN_BYTES=0)
    local t0=$SECONDS rc lines waited=0
    while :; do
        touch "$TMP/fe-baton.log"
        lines=$(wc -l <"$TMP/fe-baton.log")
        start_in "$NS_F" fe-baton env -u BATON_BIN "${BATON_COMMON[@]}" \
            BATON_ROUTES='*=objects' BATON_STATIC_SERVICES="objects=$BE_IP:$BACKEND_PORT" \
            "${fe_env[@]}" \
            "${SERVER_PIN[@]}" "$BATON_RUN"
        FE_PID=$LAST_PID
        until admin_ready "$NS_F" 2>/dev/null || ! alive "$FE_PID"; do sleep 0.2; done
        alive "$FE_PID" && break
        rc=0
        wait "$FE_PID" 2>/dev/null || rc=$?
        untrack "$FE_PID"
        # A socket that was frozen and thawed (a handoff that fell back) leaves TCP_REPAIR
        # with SO_REUSEADDR cleared by the kernel, so its TIME_WAIT (60 s) blocks the next
        # bind of the inbound port. That is a baton bug; wait it out, and say so.
        if tail -n +$((lines + 1)) "$TMP/fe-baton.log" | grep -q 'Address already in use' && ((SECONDS - t0 < 90)); then
            waited=1
            sleep 2
            continue
        fi
        show_log fe-baton
        die "fe baton ($mode) exited at startup: it $(describe_exit "$rc")"
    done
    if ((waited)); then
        log "fe baton ($mode) could bind :$BATON_PORT only after $((SECONDS - t0))s (TIME_WAIT of thawed sockets)"
        R[bindwaits]=$((${R[bindwaits]:-0} + 1))
        R[bindwait]=$((${R[bindwait]:-0} + SECONDS - t0))
    fi
    FE_MODE=$mode
    FE_STARTS=$((FE_STARTS + 1))
    wait_until 20 fe-baton "$FE_PID" admin_ready "$NS_F"
    if is_handoff_target "$mode"; then
        [[ $(handoff_enabled "$NS_F") == 1 ]] || { show_log fe-baton; die "fe baton ($mode): BATON_HANDOFF=on but baton_handoff_enabled is not 1"; }
    fi
    log "fe baton up in $mode mode (pid $FE_PID)"
}

# check_body TARGET SIZE: GET through TARGET from the client and compare with the file;
# for handoff, the request must have been handed off (not proxied after a fallback). For
# policy it need not be (a path's first request is proxied and measured by design): what
# the policy did goes to CHECK_POLICY, for the log.
CHECK_POLICY=""
check_body() {
    local t=$1 s=$2 got url d fb sk
    url="${TARGET_URL[$t]}/$s"
    ! is_handoff_target "$t" || scrape "$NS_F" "$TMP/check-before.txt"
    got=$(ip netns exec "$NS_C" curl -s --max-time 10 -o "$TMP/check.body" -w '%{http_code} %{size_download}' "$url") ||
        die "$t: curl $url failed (exit $?)"
    [[ $got == "200 ${SIZE_BYTES[$s]}" ]] || die "$t: GET $url gave status/size '$got', expected '200 ${SIZE_BYTES[$s]}'"
    cmp -s "$TMP/check.body" "$TMP/www/$s" || die "$t: GET $url returned a body that differs from the file"
    if [[ $t == handoff ]]; then
        scrape "$NS_F" "$TMP/check-after.txt"
        d=$(mdelta "$TMP/check-before.txt" "$TMP/check-after.txt" baton_handoffs_total)
        if [[ $d != 1 ]]; then
            fb=$(labeled_deltas "$TMP/check-before.txt" "$TMP/check-after.txt" baton_handoff_fallbacks_total)
            show_log fe-baton
            show_log be-baton
            die "handoff: GET $url was answered, but not handed off (baton_handoffs_total +$d; fallbacks: ${fb:-none}). Rerun with BATON_LOG=info RAW_DIR=... to see why."
        fi
    elif [[ $t == policy ]]; then
        scrape "$NS_F" "$TMP/check-after.txt"
        d=$(mdelta "$TMP/check-before.txt" "$TMP/check-after.txt" baton_handoffs_total)
        sk=$(labeled_deltas "$TMP/check-before.txt" "$TMP/check-after.txt" baton_handoff_skipped_total)
        fb=$(labeled_deltas "$TMP/check-before.txt" "$TMP/check-after.txt" baton_handoff_fallbacks_total)
        CHECK_POLICY+="${CHECK_POLICY:+, }$s $(if [[ $d == 1 ]]; then echo 'handed off'; else echo "proxied (${sk:+skipped: $sk}${fb:+${sk:+; }fallbacks: $fb})"; fi)"
    fi
}
# check_target TARGET: every size through TARGET.
check_target() {
    local s
    for s in 1k 64k 1m; do check_body "$1" "$s"; done
    log "$1: OK (bodies of 1k, 64k, 1m verified through it$([[ $1 == handoff ]] && echo ', each handed off')$([[ $1 == policy ]] && echo "; size policy, first request of each path: $CHECK_POLICY"))"
}
CHECKED=""
ensure_target() { # start the fe baton in the target's mode and check it once
    local t=$1
    [[ $t == direct ]] || fe_start "$t"
    if [[ " $CHECKED " != *" $t "* ]]; then
        check_target "$t"
        CHECKED="$CHECKED $t"
    fi
}

# ---------------------------------------------------------------- load runs
declare -A R=()
WRK_TPUT="wrk -t$WRK_THREADS -c$WRK_CONNS -d${DURATION}s"
WRK_LAT="wrk -t1 -c1 -d${LAT_DURATION}s --latency"

# K TARGET SIZE CONN: the key prefix of a row.
per_run() {
    local k
    for ((k = 1; k <= RUNS; k++)); do echo "${R[$1:$2:$3:$4:$k]:-}"; done
}

# check_watch WHEN: stop if a baton's socket destruction watch has ended. Without it the
# be never sends close notices: the fe's redirects and the be's local-delivery entries of
# every later moved connection stay for BATON_HANDOFF_FLOW_TTL (1h), and a new connection
# from a client port that was handed off before is redirected to the be and never
# answered (seen here: client stuck in SYN-SENT, wrk "unable to connect ... timed out").
# Numbers measured after that are not handoff mode as designed, so the run stops.
check_watch() {
    local n line
    for n in be-baton fe-baton; do
        line=$(grep -m1 'socket destruction watch ended' "$TMP/$n.log" || true)
        [[ -z $line ]] && continue
        state_dump "$n: socket destruction watch ended"
        show_log "$n"
        die "$n's socket destruction watch ended ($1): ${line#* }
    From then on no close notices are sent for moved connections, so redirects (fe 'moved': $(nft_count "$NS_F" map moved)) and
    local-delivery entries (be 'restored': $(nft_count "$NS_B" set restored)) leak for BATON_HANDOFF_FLOW_TTL, and client ports that
    were handed off before are black-holed when reused. This is a baton bug, not a benchmark problem; stopping."
    done
}

# run_one TARGET SIZE CONN RUN: warm-up, throughput run, latency run. Results go to
# R[TARGET:SIZE:CONN:METRIC:RUN].
run_one() {
    local t=$1 s=$2 c=$3 k=$4 url hdr=() pids=() bpids=() c0 c1 b0 b1 out lat err reqs rps cpu="" bcpu="" p50 p99 tag key m0 m1
    url="${TARGET_URL[$t]}/$s"
    [[ $c == close ]] && hdr=(-H 'Connection: close')
    key="$t:$s:$c"
    out="$TMP/wrk-$t-$s-$c-run$k.txt"
    lat="$TMP/wrk-lat-$t-$s-$c-run$k.txt"
    tag="${SIZE_LABEL[$s]}, ${CONN_LABEL[$c]}, run $k/$RUNS"
    [[ $t == direct ]] || require_alive fe-baton "$FE_PID"
    if ((WARMUP > 0)); then
        run_client "$TMP/warmup.txt" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WARMUP}s" "${hdr[@]}" "$url" ||
            { cat "$TMP/warmup.txt" >&2; state_dump "wrk warm-up against $t failed ($tag)"; die "wrk warm-up against $t failed ($tag)"; }
        sleep 0.5
    fi
    if [[ $t != direct ]]; then
        mapfile -t pids < <(proc_tree "$FE_PID")
        mapfile -t bpids < <(proc_tree "$BE_PID")
        scrape "$NS_F" "$TMP/m-$key-$k-0.txt"
        c0=$(cpu_ticks "${pids[@]}")
        b0=$(cpu_ticks "${bpids[@]}")
    fi
    run_client "$out" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${DURATION}s" "${hdr[@]}" "$url" ||
        { cat "$out" >&2; state_dump "wrk against $t failed ($tag)"; die "wrk against $t failed ($tag)"; }
    if [[ $t != direct ]]; then
        c1=$(cpu_ticks "${pids[@]}")
        b1=$(cpu_ticks "${bpids[@]}")
        scrape "$NS_F" "$TMP/m-$key-$k-1.txt"
    fi
    reqs=$(awk '/ requests in / { print $1; exit }' "$out")
    rps=$(awk '$1 == "Requests/sec:" { print $2 }' "$out")
    [[ -n $reqs && -n $rps ]] || { cat "$out" >&2; die "cannot parse wrk output for $t ($tag)"; }
    ((reqs > 0)) || { cat "$out" >&2; die "$t ($tag): wrk completed no request"; }
    if [[ $t != direct ]]; then
        cpu=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.4f", d / hz / n * 10000 }')
        bcpu=$(awk -v d=$((b1 - b0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.4f", d / hz / n * 10000 }')
    fi
    err=$(wrk_errors "$out")
    [[ -z $err ]] || note "$t $tag, throughput: $err (of $reqs requests)"
    if is_handoff_target "$t"; then
        m0="$TMP/m-$key-$k-0.txt" m1="$TMP/m-$key-$k-1.txt"
        R[$key:ho:$k]=$(mdelta "$m0" "$m1" baton_handoffs_total)
        R[$key:att:$k]=$(mdelta "$m0" "$m1" baton_handoff_attempts_total)
        R[$key:fb:$k]=$(mdelta "$m0" "$m1" baton_handoff_fallbacks_total)
        R[$key:fbr:$k]=$(labeled_deltas "$m0" "$m1" baton_handoff_fallbacks_total)
        R[$key:sk:$k]=$(mdelta "$m0" "$m1" baton_handoff_skipped_total)
        R[$key:skr:$k]=$(labeled_deltas "$m0" "$m1" baton_handoff_skipped_total)
        R[$key:hist:$k]=$(hist "$m0" "$m1")
        [[ ${R[$key:fb:$k]} == 0 ]] || note "$t $tag, throughput: ${R[$key:fb:$k]} of ${R[$key:att:$k]} handoff attempts fell back (${R[$key:fbr:$k]})"
        [[ $t != handoff || ${R[$key:sk:$k]} == 0 ]] || note "handoff $tag, throughput: ${R[$key:sk:$k]} requests skipped by the size policy (${R[$key:skr:$k]}) although BATON_HANDOFF_MIN_BYTES=0"
    fi
    ! is_handoff_target "$t" || check_watch "after the throughput run, $tag"
    sleep 1
    [[ $t == direct ]] || scrape "$NS_F" "$TMP/m-$key-$k-2.txt"
    run_client "$lat" wrk -t1 -c1 -d"${LAT_DURATION}s" --latency "${hdr[@]}" "$url" ||
        { cat "$lat" >&2; state_dump "wrk --latency against $t failed ($tag)"; die "wrk --latency against $t failed ($tag)"; }
    [[ $t == direct ]] || scrape "$NS_F" "$TMP/m-$key-$k-3.txt"
    if [[ $(awk '/ requests in / { print $1; exit }' "$lat") == 0 ]]; then
        # Not one response in the whole run: the connection hung. Record no latency.
        note "$t $tag, latency run: wrk completed 0 requests in ${LAT_DURATION}s (the single connection got no response)"
        state_dump "$t $tag: latency run completed 0 requests"
        p50=NaN p99=NaN
    else
        p50=$(wrk_pct_ms "$lat" 50)
        p99=$(wrk_pct_ms "$lat" 99)
    fi
    [[ -n $p50 && -n $p99 ]] || { cat "$lat" >&2; die "cannot parse wrk --latency output for $t ($tag)"; }
    err=$(wrk_errors "$lat")
    [[ -z $err ]] || note "$t $tag, latency: $err"
    if is_handoff_target "$t"; then
        m0="$TMP/m-$key-$k-2.txt" m1="$TMP/m-$key-$k-3.txt"
        R[$key:lho:$k]=$(mdelta "$m0" "$m1" baton_handoffs_total)
        R[$key:lfb:$k]=$(mdelta "$m0" "$m1" baton_handoff_fallbacks_total)
        R[$key:lsk:$k]=$(mdelta "$m0" "$m1" baton_handoff_skipped_total)
        R[$key:lskr:$k]=$(labeled_deltas "$m0" "$m1" baton_handoff_skipped_total)
        R[$key:lhist:$k]=$(hist "$m0" "$m1")
        [[ ${R[$key:lfb:$k]} == 0 ]] || note "$t $tag, latency run: ${R[$key:lfb:$k]} handoff attempts fell back ($(labeled_deltas "$m0" "$m1" baton_handoff_fallbacks_total))"
    fi
    ! is_handoff_target "$t" || check_watch "after the latency run, $tag"
    [[ $t == direct ]] || require_alive fe-baton "$FE_PID"
    require_alive be-baton "$BE_PID"
    R[$key:reqs:$k]=$reqs
    R[$key:rps:$k]=$rps
    R[$key:cpu:$k]=$cpu
    R[$key:bcpu:$k]=$bcpu
    R[$key:p50:$k]=$p50
    R[$key:p99:$k]=$p99
    local extra=""
    ! is_handoff_target "$t" || extra="  handoffs ${R[$key:ho:$k]} (fallbacks ${R[$key:fb:$k]}$([[ $t == policy ]] && echo ", skipped ${R[$key:sk:$k]}")), p50 $(hist_pct "${R[$key:hist:$k]}" 50), p99 $(hist_pct "${R[$key:hist:$k]}" 99); c=1: p50 $(hist_pct "${R[$key:lhist:$k]}" 50)"
    log "$(printf '%-7s %-3s %-9s run %d/%d %9s req/s  p50 %s ms  p99 %s ms  FE CPU %s s/10k' "$t" "$s" "$c" "$k" "$RUNS" \
        "$rps" "$p50" "$p99" "${cpu:--}")$extra"
    sleep 1
}

# run_probe TARGET SIZE RUN: PROBES new connections, one at a time at PROBE_RATE/s.
# R[TARGET:SIZE:probe:METRIC:RUN] = p50, p99 (ms, client-observed first-request latency),
# err; for handoff and policy also the handoff (and skipped) counts and histogram over
# the probe.
run_probe() {
    local t=$1 s=$2 k=$3 key="$1:$2:probe" out m0 m1 port host n err
    out="$TMP/probe-$t-$s-run$k.txt"
    host=${TARGET_URL[$t]#http://}
    port=${host##*:}
    host=${host%:*}
    ! is_handoff_target "$t" || scrape "$NS_F" "$TMP/m-$key-$k-0.txt"
    run_client "$out" "$PYTHON" "$TMP/probe.py" "$host" "$port" "/$s" "$PROBES" "$PROBE_RATE" ||
        { cat "$out" >&2; die "probe against $t failed (${SIZE_LABEL[$s]}, run $k/$RUNS)"; }
    n=$(grep -c '^[0-9]' "$out" || true)
    err=$(grep -c '^error' "$out" || true)
    ((err == 0)) || note "$t ${SIZE_LABEL[$s]} run $k/$RUNS, first-request probe: $err of $PROBES failed ($(grep '^error' "$out" | sort | uniq -c | sort -rn | head -n 2 | tr -s ' ' | tr '\n' ';'))"
    ((n > 0)) || die "probe against $t: no request succeeded (see $out)"
    R[$key:p50:$k]=$(grep '^[0-9]' "$out" | sort -g | awk '{ v[NR] = $1 } END { printf "%.3f", v[int((NR - 1) * 0.50) + 1] / 1000 }')
    R[$key:p99:$k]=$(grep '^[0-9]' "$out" | sort -g | awk '{ v[NR] = $1 } END { printf "%.3f", v[int((NR - 1) * 0.99) + 1] / 1000 }')
    R[$key:err:$k]=$err
    if is_handoff_target "$t"; then
        scrape "$NS_F" "$TMP/m-$key-$k-1.txt"
        m0="$TMP/m-$key-$k-0.txt" m1="$TMP/m-$key-$k-1.txt"
        R[$key:ho:$k]=$(mdelta "$m0" "$m1" baton_handoffs_total)
        R[$key:fb:$k]=$(mdelta "$m0" "$m1" baton_handoff_fallbacks_total)
        R[$key:sk:$k]=$(mdelta "$m0" "$m1" baton_handoff_skipped_total)
        R[$key:skr:$k]=$(labeled_deltas "$m0" "$m1" baton_handoff_skipped_total)
        R[$key:hist:$k]=$(hist "$m0" "$m1")
        [[ ${R[$key:fb:$k]} == 0 ]] || note "$t ${SIZE_LABEL[$s]} run $k/$RUNS, first-request probe: ${R[$key:fb:$k]} handoff attempts fell back ($(labeled_deltas "$m0" "$m1" baton_handoff_fallbacks_total))"
        check_watch "after the first-request probe, ${SIZE_LABEL[$s]}, run $k/$RUNS"
    fi
    log "$(printf '%-7s %-3s probe     run %d/%d  first request p50 %s ms  p99 %s ms (%d ok, %d errors)' "$t" "$s" "$k" "$RUNS" "${R[$key:p50:$k]}" "${R[$key:p99:$k]}" "$n" "$err")$(
        if is_handoff_target "$t"; then echo "  handoffs ${R[$key:ho:$k]} (fallbacks ${R[$key:fb:$k]}$([[ $t == policy ]] && echo ", skipped ${R[$key:sk:$k]}")), p50 $(hist_pct "${R[$key:hist:$k]}" 50), p99 $(hist_pct "${R[$key:hist:$k]}" 99)"; fi)"
}

runs_list() { # TARGET SIZE CONN METRIC FORMAT
    local v list="" k
    for ((k = 1; k <= RUNS; k++)); do
        v=${R[$1:$2:$3:$4:$k]:-}
        list+="${list:+, }$(fmt "$v" "$5")"
    done
    echo "$list"
}
spread() {
    local k
    for ((k = 1; k <= RUNS; k++)); do echo "${R[$1:$2:$3:rps:$k]:-}"; done | awk -v med="${R[$1:$2:$3:rps]}" '
        $1 ~ /^[0-9.]+$/ { v = $1 + 0; if (n == 0 || v < lo) lo = v; if (n == 0 || v > hi) hi = v; n++ }
        END { if (n < 2 || med + 0 == 0) print "n/a"; else printf "%.1f%%\n", (hi - lo) / med * 100 }'
}

START_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$SECONDS
scrape "$NS_B" "$TMP/be-metrics-start.txt"
for s in $SIZES; do
    for ((k = 1; k <= RUNS; k++)); do
        for t in $ALL_TARGETS; do
            has_target "$t" || continue
            ensure_target "$t"
            for c in $CONN_MODES; do
                log "run: $t ${SIZE_LABEL[$s]} ${CONN_LABEL[$c]} (round $k/$RUNS)"
                run_one "$t" "$s" "$c" "$k"
            done
            if ((PROBES > 0)); then
                run_probe "$t" "$s" "$k"
                sleep 1
            fi
        done
    done
    for t in $ALL_TARGETS; do
        has_target "$t" || continue
        for c in $CONN_MODES; do
            key="$t:$s:$c"
            for m in rps p50 p99 cpu bcpu; do
                vals=()
                for ((k = 1; k <= RUNS; k++)); do vals+=("${R[$key:$m:$k]:-}"); done
                R[$key:$m]=$(median "${vals[@]}")
            done
            if is_handoff_target "$t"; then
                for m in ho att fb sk lho lfb lsk; do
                    tot=0
                    for ((k = 1; k <= RUNS; k++)); do tot=$((tot + ${R[$key:$m:$k]:-0})); done
                    R[$key:$m]=$tot
                done
                h="" lh=""
                for ((k = 1; k <= RUNS; k++)); do
                    h=$(hist_add "$h" "${R[$key:hist:$k]:-}")
                    lh=$(hist_add "$lh" "${R[$key:lhist:$k]:-}")
                done
                R[$key:hist]=$h
                R[$key:lhist]=$lh
            fi
            ((RUNS == 1)) || log "$(printf '%-7s %-3s %-9s median of %d: %s req/s  p50 %s ms  p99 %s ms  FE CPU %s s/10k' "$t" "$s" "$c" "$RUNS" \
                "$(fmt "${R[$key:rps]}" '%.0f')" "$(fmt "${R[$key:p50]}" '%.3f')" "$(fmt "${R[$key:p99]}" '%.3f')" "$(fmt "${R[$key:cpu]}" '%.4f')")"
        done
        if ((PROBES > 0)); then
            key="$t:$s:probe"
            for m in p50 p99; do
                vals=()
                for ((k = 1; k <= RUNS; k++)); do vals+=("${R[$key:$m:$k]:-}"); done
                R[$key:$m]=$(median "${vals[@]}")
            done
            tot=0
            for ((k = 1; k <= RUNS; k++)); do tot=$((tot + ${R[$key:err:$k]:-0})); done
            R[$key:err]=$tot
            if is_handoff_target "$t"; then
                for m in ho fb sk; do
                    tot=0
                    for ((k = 1; k <= RUNS; k++)); do tot=$((tot + ${R[$key:$m:$k]:-0})); done
                    R[$key:$m]=$tot
                done
                h=""
                for ((k = 1; k <= RUNS; k++)); do h=$(hist_add "$h" "${R[$key:hist:$k]:-}"); done
                R[$key:hist]=$h
            fi
        fi
    done
done
ELAPSED=$((SECONDS - T0))

# ---------------------------------------------------------------- after the load
sleep 2 # let the last close notices arrive
scrape "$NS_B" "$TMP/be-metrics-end.txt"
BE_REFUSED=$(labeled_deltas "$TMP/be-metrics-start.txt" "$TMP/be-metrics-end.txt" baton_handoff_refused_total)
BE_ABORTED=$(mdelta "$TMP/be-metrics-start.txt" "$TMP/be-metrics-end.txt" baton_handoff_aborted_total)
BE_OFFERS=$(mdelta "$TMP/be-metrics-start.txt" "$TMP/be-metrics-end.txt" baton_handoff_offers_total)
BE_CLOSED_SENT=$(mdelta "$TMP/be-metrics-start.txt" "$TMP/be-metrics-end.txt" baton_handoff_closed_sent_total)
BE_ACTIVE=$(msum "$TMP/be-metrics-end.txt" baton_handoff_active_connections)
BE_PASSED=$(mdelta "$TMP/be-metrics-start.txt" "$TMP/be-metrics-end.txt" baton_handoff_passed_total)
BE_PASS_FALLBACKS=$(mdelta "$TMP/be-metrics-start.txt" "$TMP/be-metrics-end.txt" baton_handoff_pass_fallbacks_total)
((BE_PASS_FALLBACKS == 0)) || note "be baton relayed $BE_PASS_FALLBACKS moved connection(s) the application did not take"
[[ -z $BE_REFUSED ]] || note "be baton refused handoffs: $BE_REFUSED"
((BE_ABORTED == 0)) || note "be baton aborted $BE_ABORTED restored connection(s) (no \"go\")"
((BE_ACTIVE == 0)) || note "be baton still serves $BE_ACTIVE moved connection(s) after the load"
BE_RESTORED_LEFT=$(nft_count "$NS_B" set restored)
[[ -z $BE_RESTORED_LEFT || $BE_RESTORED_LEFT == 0 ]] || note "be: $BE_RESTORED_LEFT flow(s) left in the 'restored' set after the load"
if is_handoff_target "$FE_MODE"; then
    scrape "$NS_F" "$TMP/fe-metrics-end.txt"
    FE_MOVED_LEFT=$(nft_count "$NS_F" map moved)
    [[ -z $FE_MOVED_LEFT || $FE_MOVED_LEFT == 0 ]] || note "fe: $FE_MOVED_LEFT redirect(s) left in the 'moved' map after the load (close notices missing)"
fi
if [[ -n $FE_PID ]]; then
    stop_pid "$FE_PID" 10
    [[ $STOP_RC == 0 ]] || note "fe baton did not exit 0 on SIGTERM (exit: $STOP_RC)"
fi
stop_pid "$BE_PID" 15
[[ $STOP_RC == 0 ]] || note "be baton did not exit 0 on SIGTERM (exit: $STOP_RC)"
for n in fe-baton be-baton; do
    if grep -qiE 'error|panic' "$TMP/$n.log"; then
        note "$n logged errors: $(grep -iE 'error|panic' "$TMP/$n.log" | sed 's/^[^ ]* //' | cut -c1-160 | sort | uniq -c | sort -rn | head -n 3 | tr -s ' ' | tr '\n' ';')"
    fi
    # (the be baton's inbound listener is unused here, so its empty BATON_ROUTES is expected)
    if grep -E ' WARN ' "$TMP/$n.log" | grep -qv 'BATON_ROUTES is empty'; then
        note "$n logged warnings: $(grep -E ' WARN ' "$TMP/$n.log" | grep -v 'BATON_ROUTES is empty' | sed 's/^[^ ]* //' | cut -c1-160 | sort | uniq -c | sort -rn | head -n 3 | tr -s ' ' | tr '\n' ';')"
    fi
done

((${R[bindwaits]:-0} == 0)) || note "the fe baton could not bind :$BATON_PORT at ${R[bindwaits]} of its $FE_STARTS starts (EADDRINUSE) and started only after waiting ${R[bindwait]}s in all: after a handoff falls back, the thawed socket has lost SO_REUSEADDR (the kernel clears it when TCP_REPAIR is switched off), so its TIME_WAIT blocks binding the inbound port for 60 s (baton bug)"

# ---------------------------------------------------------------- verdicts
# verdict: "met" / "missed" / "n/a" for a numeric comparison.
cmpv() { awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN { if (a == "" || b == "" || a == "NaN" || b == "NaN") { print "n/a"; exit }
    ok = (op == "<=") ? (a + 0 <= b + 0) : (op == ">=") ? (a + 0 >= b + 0) : (a + 0 < b + 0); print ok ? "**met**" : "**missed**" }'; }
VERDICTS=()
# pooled_hist FIELD CONN...: the handoff histogram FIELD (hist, lhist) of the given
# connection modes (or "probe"), added over all sizes.
pooled_hist() {
    local f=$1 s c h=""
    shift
    for s in $SIZES; do
        for c in "$@"; do h=$(hist_add "$h" "${R[handoff:$s:$c:$f]:-}"); done
    done
    echo "$h"
}
lat_verdict() { # LABEL HIST
    local n us
    n=$(hist_count "$2")
    ((n > 0)) || return 0
    us=$(hist_pct_us "$2" 50)
    VERDICTS+=("$1 ($n handoffs, all sizes): p50 $(hist_pct "$2" 50), p99 $(hist_pct "$2" 99): $(cmpv "$us" "<=" 300)$(if [[ $us == 300 ]]; then echo ' (p50 is in the 200–300 µs bucket, so at most 300 µs)'; fi)")
}
verdicts() {
    local c key_h key_p key_d r v
    if [[ " $SIZES " == *" 1m "* ]] && has_target handoff; then
        for c in $CONN_MODES; do
            key_h="handoff:1m:$c" key_p="proxy:1m:$c" key_d="direct:1m:$c"
            if has_target proxy; then
                r=$(awk -v h="${R[$key_h:cpu]}" -v p="${R[$key_p:cpu]}" 'BEGIN { if (h == "NaN" || p == "NaN" || p + 0 == 0) print "NaN"; else printf "%.3f", h / p }')
                VERDICTS+=("1 MiB, ${CONN_LABEL[$c]}: FE CPU per request ≤ 1/5 of proxy mode: handoff / proxy = $(fmt "${R[$key_h:cpu]}" '%.4f') / $(fmt "${R[$key_p:cpu]}" '%.4f') s per 10k req = $(fmt "$r" '%.3f'): $(cmpv "$r" "<=" 0.2)")
            fi
            if has_target direct; then
                r=$(ratio "${R[$key_h:rps]}" "${R[$key_d:rps]}")
                VERDICTS+=("1 MiB, ${CONN_LABEL[$c]}: handoff throughput ≥ 90% of direct: $(fmt "${R[$key_h:rps]}" '%.0f') / $(fmt "${R[$key_d:rps]}" '%.0f') req/s = $r: $(cmpv "$r" ">=" 0.9)")
            fi
        done
    fi
    if has_target handoff; then
        ((PROBES > 0)) && lat_verdict "handoff latency (freeze → \"go\") p50 < 300 µs, one handoff at a time (first-request probes, $PROBE_RATE/s)" "$(pooled_hist hist probe)"
        [[ " $CONN_MODES " != *" close "* ]] || lat_verdict "handoff latency p50 < 300 µs, back to back on one connection at a time (wrk -c1 with Connection: close)" "$(pooled_hist lhist close)"
        [[ " $CONN_MODES " != *" close "* ]] || lat_verdict "handoff latency p50 < 300 µs under load ($WRK_CONNS connections with Connection: close)" "$(pooled_hist hist close)"
        [[ " $CONN_MODES " != *" keepalive "* ]] || lat_verdict "handoff latency p50 < 300 µs, keep-alive: $WRK_CONNS connections opened at once" "$(pooled_hist hist keepalive)"
    fi
    if [[ " $SIZES " == *" 1k "* ]] && has_target handoff && has_target proxy; then
        for c in $CONN_MODES; do
            key_h="handoff:1k:$c" key_p="proxy:1k:$c"
            r=$(ratio "${R[$key_h:rps]}" "${R[$key_p:rps]}")
            v=$(ratio "${R[$key_h:p50]}" "${R[$key_p:p50]}")
            VERDICTS+=("1 KiB, ${CONN_LABEL[$c]}: handoff not more than 20% slower than proxy: throughput handoff / proxy = $r (≥ 0.80: $(cmpv "$r" ">=" 0.8)); p50 latency handoff / proxy = $v (≤ 1.20: $(cmpv "$v" "<=" 1.2))")
        done
        if ((PROBES > 0)); then
            v=$(ratio "${R[handoff:1k:probe:p50]}" "${R[proxy:1k:probe:p50]}")
            VERDICTS+=("1 KiB, first request on a new connection (probe): handoff / proxy p50 = $(fmt "${R[handoff:1k:probe:p50]}" '%.3f') / $(fmt "${R[proxy:1k:probe:p50]}" '%.3f') ms = $v (≤ 1.20: $(cmpv "$v" "<=" 1.2))")
        fi
    fi
}
verdicts

# ---------------------------------------------------------------- report
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
extra_env=$(env | grep -E '^BATON_' | grep -vE '^BATON_(BIN|LOG)=' | sort | tr '\n' ' ' || true)
if [[ $PIN == 1 ]]; then
    pinning="wrk on CPU $CLIENT_CPUS; fe baton, be baton and be $APP_NAME on CPU $SERVER_CPUS (\`taskset\`); kernel softirq work runs wherever the packet is sent from"
else
    pinning="none (PIN=0): the kernel schedules everything on the $(nproc) CPUs"
fi

# Prints the results file $1 with its handoff section's generated part replaced by the
# file $2 (which starts with the section title and ends with GEN_END), or with the
# section inserted before INSERT_BEFORE, or appended. Only the generated part goes:
# the rest of the section (from GEN_END, or in a section without markers from its
# first "### Analysis" heading, to the next "## " heading) is kept as it is. A section
# with neither is kept whole under an "### Analysis" heading rather than lost, and a
# section always ends up with an "### Analysis" subsection.
replace_section() {
    awk -v title="$SECTION_TITLE" -v before="$INSERT_BEFORE" -v sec="$2" -v gen_end="$GEN_END" '
        # state 0: outside the section; 1: in its generated part (or, without markers,
        # before its "### Analysis"); 2: in the part that is kept.
        function emit(  l) {
            # Neither an end marker nor "### Analysis": nothing tells generated from
            # hand-written text, so all of it is kept.
            if (state == 1 && old ~ /[^ \n]/)
                kept = "### Analysis\n\n_Kept from the previous section, which had neither markers nor an `### Analysis` heading: review it._\n\n" old
            while ((getline l < sec) > 0) print l
            close(sec)
            if (kept !~ /(^|\n)### Analysis/) kept = "### Analysis\n\n_Not written yet._\n\n" kept
            printf "%s", kept
            done = 1
        }
        /^## / && state { emit(); state = 0 }
        /^## / && !done && index($0, title) == 1 { state = 1; kept = ""; old = ""; next }
        /^## / && !done && index($0, before) == 1 { emit() }
        # (The generated part ends with a blank line of its own.)
        state == 1 && $0 == gen_end { state = 2; lead = 1; next }
        state == 2 && lead && $0 == "" { next }
        state == 2 { lead = 0 }
        state == 1 && /^### Analysis/ { state = 2; kept = $0 "\n"; next }
        state == 1 { old = old $0 "\n"; next }
        state == 2 { kept = kept $0 "\n"; next }
        { print }
        END {
            if (state) emit()
            else if (!done) { print ""; emit() }
        }' "$1"
}

{
    echo "$SECTION_TITLE"
    echo
    echo "$GEN_BEGIN"
    echo
    echo "_Written by \`benches/handoff.sh\`; rerunning it rewrites this section (a \`### Analysis\` subsection is kept as it is)._"
    echo
    if [[ $QUICK == 1 ]]; then
        echo "**QUICK=1 smoke run: durations are too short for comparisons.**"
        echo
    fi
    echo "- Date: $START_DATE; commit: $commit; baton binary built $BATON_BUILT (sha256 $BATON_SHA…); load took ${ELAPSED}s"
    echo "- Machine: kernel $(uname -r), nproc $(nproc), ${cpu_model:-unknown CPU}; load average at start: $LOADAVG, at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- Tools: $([[ $APP == pass ]] && echo "baton-pass-app (built with baton)" || nginx -v 2>&1 | sed 's/.*: //'), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }'), $(nft --version 2>/dev/null | head -n1)"
    echo "- Topology: namespaces client ($C_IP), fe ($FE_IP), be ($BE_IP) on one bridge (veth, $SUBNET.0/24, bridge netfilter off), tcp_congestion_control=reno. be: $([[ $APP == pass ]] && echo "baton-pass-app (the handoff-aware reference application: one thread, files in memory, hyper)" || echo "nginx (1 worker, sendfile)"), static files on \`0.0.0.0:$BACKEND_PORT\`, and a baton with \`BATON_HANDOFF=on\`, \`BATON_APP_ADDR=127.0.0.1:$BACKEND_PORT\`$([[ $APP == pass ]] && echo ", \`BATON_APP_PASS\` (moved connections' sockets passed to the application)"); fe: baton \`BATON_ROUTES='*=objects' BATON_STATIC_SERVICES=objects=$BE_IP:$BACKEND_PORT\`, \`BATON_HANDOFF=off\` (proxy) or \`on\` (handoff, policy), restarted whenever the target changes between proxy, handoff and policy (its netdev table is deleted after handoff and policy runs). Both batons \`BATON_WORKERS=1\`, \`BATON_LOG=$LOG_LEVEL\`, \`BATON_HANDOFF_INTERFACE=eth0\`, one shared 32-byte key${extra_env:+ (env: \`${extra_env% }\`)}"
    echo "- Targets: **direct** = client → be $APP_NAME; **proxy** = client → fe baton → be $APP_NAME; **handoff** = client → fe baton with \`BATON_HANDOFF_MIN_BYTES=0\` (always, whatever the environment says), which hands every eligible connection to be's baton ($([[ $APP == pass ]] && echo "be baton passes the socket to the application, which answers the client itself" || echo "be baton ↔ nginx over loopback, responses straight to the client")): the mechanism; **policy** = the same fe with the size policy, \`BATON_HANDOFF_MIN_BYTES=${BATON_HANDOFF_MIN_BYTES:-32768}\`$([[ -n ${BATON_HANDOFF_MIN_BYTES:-} ]] || echo ' (unset: the default)'): requests expected to get at least that many bytes are handed off, the rest proxied; a path's first request is proxied and measured, and 1 in 64 of those expected large are proxied again as a sample (the learned sizes start empty at each fe restart, so the warm-up teaches them)"
    echo "- Connections: **keep-alive** = plain wrk (each connection is handed off once, at its first request; later requests go client → fe's ingress hook → be baton); **close** = wrk \`-H 'Connection: close'\` (every request is a new connection, so a new handoff)"
    echo "- CPU pinning: $pinning"
    if ((RUNS == 1)); then
        echo "- Runs: 1 per row (RUNS=1): single runs, not medians"
    else
        echo "- Runs: **$RUNS per row; req/s, p50, p99 and CPU are the median of the $RUNS runs**, each column on its own. The runs were made in $RUNS interleaved rounds (each round runs every target and connection mode once). Handoff counts are totals over the $RUNS runs, and the handoff-latency percentiles come from the $RUNS runs' histograms added together"
    fi
    echo "- Throughput: \`$WRK_TPUT\`$( ((WARMUP > 0)) && echo " after a ${WARMUP}s untimed warm-up"); **p50/p99 are from a separate latency run** \`$WRK_LAT\` (one connection; wrk measures from writing the request to the end of the response, so connection setup is excluded but the handoff is included; with keep-alive only the connection's first request is handed off)"
    if ((PROBES > 0)); then
        echo "- First request (probe): $PROBES new connections per run, one at a time, at most $PROBE_RATE/s, each a keep-alive \`GET\` (the client closes the connection after the body) from a small Python client in the client namespace; p50/p99 of the time from \`connect()\` to the last body byte (Python adds a fixed cost to every target alike). For handoff each probe is one uncontended handoff; for policy one too if the size is expected large, else a proxied request"
    fi
    echo "- FE CPU s / 10k req: the fe baton's utime+stime+cutime+cstime over the throughput run, per 10 000 requests (\`CLK_TCK\`=$CLK_TCK, so one tick is $(awk -v hz="$CLK_TCK" 'BEGIN { printf "%g", 1 / hz }') s). Not included: softirq work of fe's ingress hook forwarding a moved connection's packets, which the kernel charges to whatever process runs when they arrive (mostly wrk). BE baton CPU (handoffs table) is the same figure for be's baton, which serves moved connections"
    echo "- Handoff latency: \`baton_handoff_duration_seconds\` (fe, freeze → \"go\") bucket deltas over the run; a percentile is shown as the upper bound of the bucket that holds it (buckets 50, 100, 150, 200, 250, 300, 400, 500, 750 µs, 1, 2, 5, 10, 25, 50 ms)"
    for s in $SIZES; do
        echo
        echo "### ${SIZE_LABEL[$s]}"
        echo
        echo "| connections | target | req/s | p50 ms | p99 ms | FE CPU s / 10k req | req/s vs direct | handoff or policy / proxy |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|"
        for c in $CONN_MODES; do
            for t in $DISPLAY_TARGETS; do
                has_target "$t" || continue
                key="$t:$s:$c"
                cpu="–"
                [[ $t == direct ]] || cpu=$(fmt "${R[$key:cpu]:-}" '%.4f')
                vd="–" vp="–"
                [[ $t == direct ]] || ! has_target direct || vd="$(ratio "${R[$key:rps]}" "${R[direct:$s:$c:rps]}")×"
                ! is_handoff_target "$t" || ! has_target proxy || vp="req/s $(ratio "${R[$key:rps]}" "${R[proxy:$s:$c:rps]}")×, p50 $(ratio "${R[$key:p50]}" "${R[proxy:$s:$c:p50]}")×, CPU $(ratio "${R[$key:cpu]}" "${R[proxy:$s:$c:cpu]}")×"
                echo "| ${CONN_LABEL[$c]} | $t | $(fmt "${R[$key:rps]:-}" '%.0f') | $(fmt "${R[$key:p50]:-}" '%.3f') | $(fmt "${R[$key:p99]:-}" '%.3f') | $cpu | $vd | $vp |"
            done
        done
        if ((PROBES > 0)); then
            for t in $DISPLAY_TARGETS; do
                has_target "$t" || continue
                key="$t:$s:probe"
                vp="–"
                ! is_handoff_target "$t" || ! has_target proxy || vp="p50 $(ratio "${R[$key:p50]}" "${R[proxy:$s:probe:p50]}")×"
                echo "| first request (probe) | $t | – | $(fmt "${R[$key:p50]:-}" '%.3f') | $(fmt "${R[$key:p99]:-}" '%.3f') | – | – | $vp |"
            done
        fi
        if has_handoff_target; then
            echo
            echo "| ${SIZE_LABEL[$s]}: handoffs in | handoffs | fallbacks | skipped (policy) | handoff p50 | handoff p99 | BE baton CPU s / 10k req |"
            echo "|---|---:|---:|---:|---:|---:|---:|"
            for t in $DISPLAY_TARGETS; do
                if ! is_handoff_target "$t" || ! has_target "$t"; then continue; fi
                for c in $CONN_MODES; do
                    key="$t:$s:$c"
                    # reasons summed over the runs: "socket=19, timeout=120", "small=5000"
                    fbr=$(for ((k = 1; k <= RUNS; k++)); do echo "${R[$key:fbr:$k]:-}"; done | sum_labeled)
                    skr=$(for ((k = 1; k <= RUNS; k++)); do echo "${R[$key:skr:$k]:-}"; done | sum_labeled)
                    lskr=$(for ((k = 1; k <= RUNS; k++)); do echo "${R[$key:lskr:$k]:-}"; done | sum_labeled)
                    echo "| $t, ${CONN_LABEL[$c]}, throughput runs (c=$WRK_CONNS) | ${R[$key:ho]} | ${R[$key:fb]}${fbr:+ ($fbr)} | ${R[$key:sk]}${skr:+ ($skr)} | $(hist_pct "${R[$key:hist]}" 50) | $(hist_pct "${R[$key:hist]}" 99) | $(fmt "${R[$key:bcpu]:-}" '%.4f') |"
                    echo "| $t, ${CONN_LABEL[$c]}, latency runs (c=1) | ${R[$key:lho]} | ${R[$key:lfb]} | ${R[$key:lsk]}${lskr:+ ($lskr)} | $(hist_pct "${R[$key:lhist]}" 50) | $(hist_pct "${R[$key:lhist]}" 99) | – |"
                done
                if ((PROBES > 0)); then
                    key="$t:$s:probe"
                    skr=$(for ((k = 1; k <= RUNS; k++)); do echo "${R[$key:skr:$k]:-}"; done | sum_labeled)
                    echo "| $t, first-request probes | ${R[$key:ho]} | ${R[$key:fb]} | ${R[$key:sk]}${skr:+ ($skr)} | $(hist_pct "${R[$key:hist]}" 50) | $(hist_pct "${R[$key:hist]}" 99) | – |"
                fi
            done
        fi
        if ((RUNS > 1)); then
            echo
            echo "| per run | req/s | spread | p50 ms | p99 ms | FE CPU s / 10k req |"
            echo "|---|---:|---:|---:|---:|---:|"
            for c in $CONN_MODES; do
                for t in $DISPLAY_TARGETS; do
                    has_target "$t" || continue
                    cpu="–"
                    [[ $t == direct ]] || cpu=$(runs_list "$t" "$s" "$c" cpu '%.4f')
                    echo "| $t, ${CONN_LABEL[$c]} | $(runs_list "$t" "$s" "$c" rps '%.0f') | $(spread "$t" "$s" "$c") | $(runs_list "$t" "$s" "$c" p50 '%.3f') | $(runs_list "$t" "$s" "$c" p99 '%.3f') | $cpu |"
                done
            done
            if ((PROBES > 0)); then
                for t in $DISPLAY_TARGETS; do
                    has_target "$t" || continue
                    echo "| $t, first request (probe) | – | – | $(runs_list "$t" "$s" probe p50 '%.3f') | $(runs_list "$t" "$s" probe p99 '%.3f') | – |"
                done
            fi
        fi
    done
    if has_handoff_target; then
        echo
        echo "be baton over the whole benchmark: $BE_OFFERS offers, refused: ${BE_REFUSED:-none}, aborted: $BE_ABORTED, close notices sent: $BE_CLOSED_SENT$([[ $APP == pass ]] && echo ", passed to the application: $BE_PASSED (relayed instead: $BE_PASS_FALLBACKS)"); left after the load: fe 'moved' ${FE_MOVED_LEFT:-n/a}, be 'restored' ${BE_RESTORED_LEFT:-n/a}."
    fi
    if ((${#VERDICTS[@]} > 0)); then
        echo
        echo "### Targets (computed by the script from the medians above)"
        echo
        for v in "${VERDICTS[@]}"; do echo "- $v"; done
    fi
    if ((${#NOTES[@]} > 0)); then
        echo
        echo "### Warnings"
        echo
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
    echo
    echo "$GEN_END"
    echo
} >"$TMP/section.md"

echo
cat "$TMP/section.md"

if [[ $WRITE_RESULTS == 1 ]]; then
    if [[ -f $RESULTS ]]; then
        replace_section "$RESULTS" "$TMP/section.md" >"$TMP/results.md"
    else
        { printf '# baton benchmark results\n\n'; cat "$TMP/section.md"; printf '### Analysis\n\n_Not written yet._\n'; } >"$TMP/results.md"
    fi
    cat "$TMP/results.md" >"$RESULTS"
    log "wrote the '$SECTION_TITLE' section of $RESULTS"
fi
