#!/usr/bin/env bash
# benches/load.sh: load benchmark of baton against HAProxy and nginx as HTTP/1.1
# reverse proxies, over veth pairs between network namespaces.
#
#   client ns --veth--+                  +--veth-- proxy ns: baton :15006 (admin 127.0.0.1:15021)
#                     |-- bridge ns br0 -|                   haproxy :8081, nginx :8082
#                     |                  +--veth-- backend ns: nginx :8080 serving /1k /64k /1m
#
# For each size it does RUNS rounds (3 by default); in each round every target (direct =
# client -> backend nginx, baton, haproxy, nginx) gets a warm-up, a throughput test
# (wrk -t2 -c32 -d8s) and a latency test (wrk -t1 -c1 -d4s --latency), so the targets
# are interleaved. It measures the proxy's CPU seconds per 10k requests, reports the
# median of each figure over the runs (with the per-run values), and measures RSS with
# 10,000 idle keep-alive client connections once per proxy. Results are printed and
# written to the "## Proxy mode (benches/load.sh)" section of benches/RESULTS.md (other
# sections of that file are kept). See benches/README.md.
#
# Run as root:  sudo benches/load.sh        smoke test:  sudo QUICK=1 benches/load.sh
# Environment (defaults in brackets):
#   RUNS [3]  DURATION [8]  LAT_DURATION [4]  WARMUP [2]  WRK_THREADS [2]  WRK_CONNS [32]
#   SIZES ["1k 64k 1m"]  TARGETS ["direct baton haproxy nginx"]
#   QUICK [0]  (1: RUNS=1 DURATION=2 LAT_DURATION=2 WARMUP=1 IDLE_CONNS=2000 unless set)
#   MEMORY [1]  IDLE_CONNS [10000]  PEER_IDLE_CONNS [min(IDLE_CONNS, 3500)]
#   RESULTS [benches/RESULTS.md]  WRITE_RESULTS [1]  NOFILE [65536]  SUBNET [10.99.0]
#   BATON_BIN [target/release/baton, built with cargo build --release]  SKIP_BUILD [0]
#   RAW_DIR [unset]  (a directory to copy raw wrk outputs, process logs and baton /metrics into)
#   Any other BATON_* variable in the environment is passed to baton unchanged.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$BENCH_DIR/lib.sh"
ROOT=$(cd "$BENCH_DIR/.." && pwd)

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    def_runs=1 def_dur=2 def_lat=2 def_warm=1 def_idle=2000
else
    def_runs=3 def_dur=8 def_lat=4 def_warm=2 def_idle=10000
fi
RUNS=${RUNS:-$def_runs}
DURATION=${DURATION:-$def_dur}
LAT_DURATION=${LAT_DURATION:-$def_lat}
WARMUP=${WARMUP:-$def_warm}
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-32}
SIZES=${SIZES:-1k 64k 1m}
TARGETS=${TARGETS:-direct baton haproxy nginx}
MEMORY=${MEMORY:-1}
IDLE_CONNS=${IDLE_CONNS:-$def_idle}
MEM_SETTLE=${MEM_SETTLE:-5}
PEER_IDLE_CONNS=${PEER_IDLE_CONNS:-$((IDLE_CONNS < 3500 ? IDLE_CONNS : 3500))}
NOFILE=${NOFILE:-65536}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
WRITE_RESULTS=${WRITE_RESULTS:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
if [[ -n ${BATON_BIN:-} ]]; then SKIP_BUILD=1; fi
BATON_BIN=${BATON_BIN:-$ROOT/target/release/baton}
SUBNET=${SUBNET:-10.99.0}
RAW_DIR=${RAW_DIR:-}

SECTION_TITLE='## Proxy mode (benches/load.sh)'
BACKEND_PORT=8080
BATON_PORT=15006
BATON_ADMIN_PORT=15021
HAPROXY_PORT=8081
NGINX_PORT=8082
C_IP=$SUBNET.1
P_IP=$SUBNET.2
B_IP=$SUBNET.3

declare -A SIZE_BYTES=([1k]=1024 [64k]=65536 [1m]=1048576)
declare -A SIZE_LABEL=([1k]="1 KiB" [64k]="64 KiB" [1m]="1 MiB")
ALL_TARGETS="direct baton haproxy nginx"
declare -A TARGET_NAME=([direct]=direct [baton]=baton [haproxy]=HAProxy [nginx]=nginx)
declare -A TARGET_URL=(
    [direct]="http://$B_IP:$BACKEND_PORT"
    [baton]="http://$P_IP:$BATON_PORT"
    [haproxy]="http://$P_IP:$HAPROXY_PORT"
    [nginx]="http://$P_IP:$NGINX_PORT"
)
declare -A TARGET_PORT=([baton]=$BATON_PORT [haproxy]=$HAPROXY_PORT [nginx]=$NGINX_PORT)

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- checks
[[ $(id -u) == 0 ]] || die "must run as root (it creates network namespaces): sudo $0"
missing=()
for cmd in ip nginx haproxy wrk python3 curl getconf awk pgrep sysctl cmp git; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
((${#missing[@]} == 0)) ||
    die "missing commands: ${missing[*]}. Install: apt-get install -y nginx haproxy wrk iproute2 python3 curl procps git diffutils"
for s in $SIZES; do [[ -n ${SIZE_BYTES[$s]:-} ]] || die "unknown size '$s' in SIZES (known: 1k 64k 1m)"; done
for t in $TARGETS; do [[ " $ALL_TARGETS " == *" $t "* ]] || die "unknown target '$t' in TARGETS (known: $ALL_TARGETS)"; done
[[ -n ${SIZES// /} && -n ${TARGETS// /} ]] || die "SIZES and TARGETS must not be empty"
for v in RUNS DURATION LAT_DURATION WARMUP WRK_THREADS WRK_CONNS IDLE_CONNS PEER_IDLE_CONNS NOFILE; do
    is_uint "${!v}" || die "$v must be a non-negative integer (got '${!v}')"
done
((RUNS > 0 && DURATION > 0 && LAT_DURATION > 0 && IDLE_CONNS > 0)) || die "RUNS, DURATION, LAT_DURATION and IDLE_CONNS must be > 0"
[[ $SUBNET =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "SUBNET must look like 10.X.Y (a /24 inside 10.0.0.0/8)"
CLK_TCK=$(getconf CLK_TCK)
if [[ -n $RAW_DIR ]]; then mkdir -p "$RAW_DIR" || die "cannot create RAW_DIR=$RAW_DIR"; fi
PYTHON=$(python3 -c 'import sys; print(sys.executable)') # the real interpreter, not a shim

# ---------------------------------------------------------------- build baton
if has_target baton; then
    if [[ $SKIP_BUILD != 1 ]]; then
        if command -v cargo >/dev/null 2>&1; then
            log "building baton: cargo build --release --bin baton"
            (cd "$ROOT" && cargo build --release --bin baton) || die "cargo build --release failed"
        elif [[ -x $BATON_BIN ]]; then
            note "cargo not in PATH: using the existing $BATON_BIN, which may be older than HEAD"
        fi
    fi
    [[ -x $BATON_BIN ]] || die "baton binary not found at $BATON_BIN (cd $ROOT && cargo build --release)"
fi

# ---------------------------------------------------------------- open-file limit
if ! ulimit -n "$NOFILE" 2>/dev/null; then
    hard=$(ulimit -Hn)
    ulimit -Sn "$hard"
    log "could not raise the open-file limit to $NOFILE; using the hard limit $(ulimit -n)"
fi
NOFILE_EFF=$(ulimit -n)
[[ $NOFILE_EFF == unlimited ]] && NOFILE_EFF=1048576
((NOFILE_EFF >= IDLE_CONNS + 1024)) ||
    die "open-file limit $NOFILE_EFF is too low for IDLE_CONNS=$IDLE_CONNS; lower IDLE_CONNS or raise the hard limit"
NGINX_PROXY_CONNS=4096 # like HAProxy's maxconn
BACKEND_CONNS=$((NOFILE_EFF - 256 < 16384 ? NOFILE_EFF - 256 : 16384))
((PEER_IDLE_CONNS <= 3500)) || die "PEER_IDLE_CONNS must be <= 3500 (HAProxy maxconn / nginx worker_connections are 4096)"

# ---------------------------------------------------------------- cleanup (always)
ID=$$
NS_S="baton-load-$ID-switch"
NS_C="baton-load-$ID-client"
NS_P="baton-load-$ID-proxy"
NS_B="baton-load-$ID-backend"
ALL_NS="$NS_S $NS_C $NS_P $NS_B"
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
        log "raw outputs and logs copied to $RAW_DIR"
    fi
    [[ -n $TMP && -d $TMP ]] && rm -rf -- "$TMP"
    if ((rc != 0)); then log "failed (exit $rc); namespaces, processes and temp files cleaned up"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TMP=$(mktemp -d /tmp/baton-load.XXXXXX)
chmod 0755 "$TMP" # nginx workers run as nobody and must read the files

# start_in NS NAME CMD...: run CMD in namespace NS in the background, log to $TMP/NAME.log;
# its PID (ip netns exec execs the command, so it is the command's own PID) goes to LAST_PID.
start_in() {
    local ns=$1 name=$2
    shift 2
    : >"$TMP/$name.log"
    ip netns exec "$ns" "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}
# run_client OUT CMD...: run CMD in the client namespace with output to OUT and wait for it,
# in the background so that a signal to this script interrupts the wait at once.
run_client() {
    local out=$1 pid rc=0
    shift
    ip netns exec "$NS_C" "$@" >"$out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    untrack "$pid"
    return "$rc"
}
# rss_kib PID: VmRSS summed over PID and its descendants.
rss_kib() {
    local p total=0 r
    for p in $(proc_tree "$1"); do
        r=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null) || r=""
        total=$((total + ${r:-0}))
    done
    echo "$total"
}
# check_body TARGET SIZE: GET through TARGET from the client and compare with the file.
check_body() {
    local t=$1 s=$2 got url
    url="${TARGET_URL[$t]}/$s"
    got=$(ip netns exec "$NS_C" curl -s --max-time 10 -o "$TMP/check.body" -w '%{http_code} %{size_download}' "$url") ||
        die "$t: curl $url failed (exit $?)"
    [[ $got == "200 ${SIZE_BYTES[$s]}" ]] || die "$t: GET $url gave status/size '$got', expected '200 ${SIZE_BYTES[$s]}'"
    cmp -s "$TMP/check.body" "$TMP/www/$s" || die "$t: GET $url returned a body that differs from the file"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "" || v == "NaN") print "n/a"; else printf f, v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "NaN" || b == "NaN" || b + 0 == 0) print "n/a"; else printf "%.2f×", a / b }'; }

# ---------------------------------------------------------------- topology
log "creating namespaces $ALL_NS (client $C_IP, proxy $P_IP, backend $B_IP)"
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
for ns in $NS_C $NS_P $NS_B; do
    ip -n "$NS_S" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$NS_S" link set "v$i" master br0 up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    i=$((i + 1))
done
ip netns exec "$NS_C" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"

# ---------------------------------------------------------------- backend: nginx with static files
mkdir -p "$TMP/www" "$TMP/backend" "$TMP/nginx-proxy" "$TMP/haproxy"
for s in 1k 64k 1m; do head -c "${SIZE_BYTES[$s]}" /dev/urandom >"$TMP/www/$s"; done
chmod 0755 "$TMP/www" && chmod 0644 "$TMP/www"/*

nginx_common() { # $1 = prefix dir
    cat <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE_EFF;
pid $1/nginx.pid;
error_log $1/error.log warn;
EOF
}
nginx_temp_paths() {
    cat <<EOF
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}
{
    nginx_common "$TMP/backend"
    cat <<EOF
events { worker_connections $BACKEND_CONNS; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
$(nginx_temp_paths "$TMP/backend")
    server {
        listen $B_IP:$BACKEND_PORT backlog=4096;
        root $TMP/www;
        location / { }
    }
}
EOF
} >"$TMP/backend/nginx.conf"

{
    nginx_common "$TMP/nginx-proxy"
    cat <<EOF
events { worker_connections $NGINX_PROXY_CONNS; }
http {
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
$(nginx_temp_paths "$TMP/nginx-proxy")
    upstream web {
        server $B_IP:$BACKEND_PORT;
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 600s;
    }
    server {
        listen $P_IP:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }
    }
}
EOF
} >"$TMP/nginx-proxy/nginx.conf"

cat >"$TMP/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 600s
    timeout server 60s
    timeout http-keep-alive 600s
frontend fe
    bind $P_IP:$HAPROXY_PORT
    default_backend be
backend be
    server web $B_IP:$BACKEND_PORT
EOF

nginx_args() { NGINX_ARGS=(-p "$1/" -c "$1/nginx.conf" -e "$1/error.log"); }
for d in backend:$NS_B nginx-proxy:$NS_P; do
    nginx_args "$TMP/${d%%:*}"
    ip netns exec "${d#*:}" nginx "${NGINX_ARGS[@]}" -t -q >"$TMP/nginx-test.log" 2>&1 ||
        { cat "$TMP/nginx-test.log" >&2; die "nginx config ${d%%:*} is invalid"; }
done
ip netns exec "$NS_P" haproxy -c -q -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy-test.log" 2>&1 ||
    { cat "$TMP/haproxy-test.log" >&2; die "haproxy config is invalid"; }

log "starting backend nginx on $B_IP:$BACKEND_PORT"
nginx_args "$TMP/backend"
start_in "$NS_B" backend nginx "${NGINX_ARGS[@]}" -g 'daemon off;'
BACKEND_PID=$LAST_PID
wait_until 10 backend "$BACKEND_PID" ip netns exec "$NS_C" curl -sf -o /dev/null --max-time 1 "${TARGET_URL[direct]}/1k"
for s in 1k 64k 1m; do check_body direct "$s"; done

# ---------------------------------------------------------------- proxies
declare -A PID_OF=([direct]="")
declare -A MEM=()

# measure_memory TARGET N: RSS idle, then with N idle keep-alive connections held by
# idle_conns.py from the client namespace, then after they are closed.
measure_memory() {
    local t=$1 n=$2 pid=${PID_OF[$1]} ipid line ok failed closed deadline open=""
    MEM[$t:idle]=$(rss_kib "$pid")
    log "$t: RSS idle $(mib "${MEM[$t:idle]}") MiB; opening $n idle keep-alive connections"
    start_in "$NS_C" "idle-$t" "$PYTHON" "$BENCH_DIR/idle_conns.py" --host "$P_IP" --port "${TARGET_PORT[$t]}" \
        --conns "$n" --path /1k
    ipid=$LAST_PID
    deadline=$((SECONDS + 60 + n / 20))
    until grep -q '^READY' "$TMP/idle-$t.log"; do
        alive "$ipid" || { show_log "idle-$t"; die "idle_conns.py against $t exited before READY"; }
        ((SECONDS < deadline)) || { show_log "idle-$t"; die "idle_conns.py against $t: not READY in time"; }
        sleep 0.2
    done
    line=$(grep -m1 '^READY' "$TMP/idle-$t.log")
    ok=$(awk '{ sub(/^ok=/, "", $2); print $2 + 0 }' <<<"$line")
    failed=$(awk '{ sub(/^failed=/, "", $3); print $3 + 0 }' <<<"$line")
    ((failed == 0)) || note "$t: $failed of $n idle connections failed: ${line#READY }"
    ((ok > 0)) || die "$t: no idle connection succeeded: $line"
    # Let every proxy settle the same way: baton parks a connection idle for
    # BATON_IDLE_PARK (1s) and its allocator returns the freed pages about a second later.
    sleep "$MEM_SETTLE"
    MEM[$t:with]=$(rss_kib "$pid")
    if [[ $t == baton ]]; then
        open=$(ip netns exec "$NS_P" curl -s --max-time 5 "http://127.0.0.1:$BATON_ADMIN_PORT/metrics" |
            awk '$1 == "baton_open_connections" { print $2 }') || true
        [[ -z $open ]] || ((open >= ok)) || note "baton: baton_open_connections=$open while $ok idle connections were held"
    fi
    closed=$(grep -c '^CLOSED' "$TMP/idle-$t.log" || true)
    ((closed == 0)) || note "$t: closed $closed idle connections while they were being held"
    stop_pid "$ipid" 10
    sleep 2
    MEM[$t:after_close]=$(rss_kib "$pid")
    MEM[$t:n]=$ok
    MEM[$t:per_conn]=$(awk -v a="${MEM[$t:idle]}" -v b="${MEM[$t:with]}" -v n="$ok" 'BEGIN { printf "%.2f", (b - a) / n }')
    log "$t: RSS with $ok conns $(mib "${MEM[$t:with]}") MiB = ${MEM[$t:per_conn]} KiB/conn${open:+ (baton_open_connections=$open)}"
}

# after_start TARGET: warm-up request, memory measurement, then check every size.
after_start() {
    local t=$1 s
    check_body "$t" 1k # the warm-up request
    sleep 0.5
    if [[ $MEMORY == 1 ]]; then
        if [[ $t == baton ]]; then measure_memory "$t" "$IDLE_CONNS"; else measure_memory "$t" "$PEER_IDLE_CONNS"; fi
    fi
    for s in 1k 64k 1m; do check_body "$t" "$s"; done
    require_alive "$t" "${PID_OF[$t]}"
    log "$t: OK (bodies of 1k, 64k, 1m verified through it)"
}

if has_target baton; then
    log "starting baton on $P_IP:$BATON_PORT (BATON_WORKERS=1)"
    start_in "$NS_P" baton env -u BATON_BIN \
        BATON_INBOUND_ADDR="$P_IP:$BATON_PORT" \
        BATON_ADMIN_ADDR="127.0.0.1:$BATON_ADMIN_PORT" \
        BATON_ROUTES='*=web' \
        BATON_STATIC_SERVICES="web=$B_IP:$BACKEND_PORT" \
        BATON_WORKERS=1 \
        BATON_LOG="${BATON_LOG:-warn}" \
        BATON_HEADER_READ_TIMEOUT="${BATON_HEADER_READ_TIMEOUT:-600s}" \
        BATON_SHUTDOWN_GRACE="${BATON_SHUTDOWN_GRACE:-5s}" \
        "$BATON_BIN"
    PID_OF[baton]=$LAST_PID
    wait_until 20 baton "$LAST_PID" ip netns exec "$NS_P" curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$BATON_ADMIN_PORT/ready"
    after_start baton
fi
if has_target haproxy; then
    log "starting HAProxy on $P_IP:$HAPROXY_PORT (nbthread 1)"
    start_in "$NS_P" haproxy haproxy -db -f "$TMP/haproxy/haproxy.cfg"
    PID_OF[haproxy]=$LAST_PID
    wait_until 10 haproxy "$LAST_PID" ip netns exec "$NS_C" curl -sf -o /dev/null --max-time 1 "${TARGET_URL[haproxy]}/1k"
    after_start haproxy
fi
if has_target nginx; then
    log "starting nginx proxy on $P_IP:$NGINX_PORT (worker_processes 1)"
    nginx_args "$TMP/nginx-proxy"
    start_in "$NS_P" nginx nginx "${NGINX_ARGS[@]}" -g 'daemon off;'
    PID_OF[nginx]=$LAST_PID
    wait_until 10 nginx "$LAST_PID" ip netns exec "$NS_C" curl -sf -o /dev/null --max-time 1 "${TARGET_URL[nginx]}/1k"
    after_start nginx
fi

# ---------------------------------------------------------------- load runs
declare -A R=()
WRK_TPUT="wrk -t$WRK_THREADS -c$WRK_CONNS -d${DURATION}s"
WRK_LAT="wrk -t1 -c1 -d${LAT_DURATION}s --latency"


# per_run TARGET SIZE METRIC: the values of every run, in run order, one per line.
per_run() {
    local k
    for ((k = 1; k <= RUNS; k++)); do echo "${R[$1:$2:$3:$k]:-}"; done
}

# run_one TARGET SIZE RUN: warm-up, throughput run and latency run; results go to
# R[TARGET:SIZE:METRIC:RUN] (METRIC = rps, reqs, cpu, p50, p99).
run_one() {
    local t=$1 s=$2 k=$3 url pids=() c0 c1 out lat err reqs rps cpu="" p50 p99 tag
    url="${TARGET_URL[$t]}/$s"
    out="$TMP/wrk-$t-$s-run$k.txt"
    lat="$TMP/wrk-lat-$t-$s-run$k.txt"
    tag="${SIZE_LABEL[$s]}, run $k/$RUNS"
    [[ $t == direct ]] || require_alive "$t" "${PID_OF[$t]}"
    if ((WARMUP > 0)); then
        run_client /dev/null wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WARMUP}s" "$url" ||
            die "wrk warm-up against $t failed ($tag)"
    fi
    if [[ $t != direct ]]; then
        mapfile -t pids < <(proc_tree "${PID_OF[$t]}")
        c0=$(cpu_ticks "${pids[@]}")
    fi
    run_client "$out" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${DURATION}s" "$url" ||
        { cat "$out" >&2; die "wrk against $t failed ($tag)"; }
    [[ $t == direct ]] || c1=$(cpu_ticks "${pids[@]}")
    reqs=$(awk '/ requests in / { print $1; exit }' "$out")
    rps=$(awk '$1 == "Requests/sec:" { print $2 }' "$out")
    [[ -n $reqs && -n $rps ]] || { cat "$out" >&2; die "cannot parse wrk output for $t ($tag)"; }
    ((reqs > 0)) || { cat "$out" >&2; die "$t ($tag): wrk completed no request"; }
    if [[ $t != direct ]]; then
        cpu=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.4f", d / hz / n * 10000 }')
    fi
    err=$(wrk_errors "$out")
    [[ -z $err ]] || note "$t $tag, throughput: $err (of $reqs requests)"
    sleep 1
    run_client "$lat" wrk -t1 -c1 -d"${LAT_DURATION}s" --latency "$url" ||
        { cat "$lat" >&2; die "wrk --latency against $t failed ($tag)"; }
    p50=$(wrk_pct_ms "$lat" 50)
    p99=$(wrk_pct_ms "$lat" 99)
    [[ -n $p50 && -n $p99 ]] || { cat "$lat" >&2; die "cannot parse wrk --latency output for $t ($tag)"; }
    err=$(wrk_errors "$lat")
    [[ -z $err ]] || note "$t $tag, latency: $err"
    [[ $t == direct ]] || require_alive "$t" "${PID_OF[$t]}"
    R[$t:$s:reqs:$k]=$reqs
    R[$t:$s:rps:$k]=$rps
    R[$t:$s:cpu:$k]=$cpu
    R[$t:$s:p50:$k]=$p50
    R[$t:$s:p99:$k]=$p99
    log "$(printf '%-7s %-6s run %d/%d %10s req/s  p50 %s ms  p99 %s ms  CPU %s s/10k' "$t" "$s" "$k" "$RUNS" \
        "$rps" "$p50" "$p99" "${cpu:--}")"
    sleep 1
}

# runs_list TARGET SIZE METRIC FORMAT: "v1, v2, v3" (the runs in order).
runs_list() {
    local v list=""
    while IFS= read -r v; do list+="${list:+, }$(fmt "$v" "$4")"; done < <(per_run "$1" "$2" "$3")
    echo "$list"
}
# spread TARGET SIZE: (max - min) / median of req/s over the runs, in percent.
spread() {
    per_run "$1" "$2" rps | awk -v med="${R[$1:$2:rps]}" '
        $1 ~ /^[0-9.]+$/ { v = $1 + 0; if (n == 0 || v < lo) lo = v; if (n == 0 || v > hi) hi = v; n++ }
        END { if (n < 2 || med + 0 == 0) print "n/a"; else printf "%.1f%%\n", (hi - lo) / med * 100 }'
}

START_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $SIZES; do
    # Rounds: every target once per round, so that a slow spell of the machine hits all
    # targets alike instead of one target's runs.
    for ((k = 1; k <= RUNS; k++)); do
        for t in $ALL_TARGETS; do
            has_target "$t" || continue
            log "run: $t ${SIZE_LABEL[$s]} (round $k/$RUNS)"
            run_one "$t" "$s" "$k"
        done
    done
    # R[TARGET:SIZE:METRIC] = the median over the runs; each metric on its own.
    for t in $ALL_TARGETS; do
        has_target "$t" || continue
        for m in rps p50 p99 cpu; do
            [[ $m == cpu && $t == direct ]] && continue
            mapfile -t vals < <(per_run "$t" "$s" "$m")
            R[$t:$s:$m]=$(median "${vals[@]}")
        done
        cpu=-
        [[ $t == direct ]] || cpu=$(fmt "${R[$t:$s:cpu]}" '%.3f')
        ((RUNS == 1)) || log "$(printf '%-7s %-6s median of %d: %s req/s  p50 %s ms  p99 %s ms  CPU %s s/10k' "$t" "$s" "$RUNS" \
            "$(fmt "${R[$t:$s:rps]}" '%.0f')" "$(fmt "${R[$t:$s:p50]}" '%.3f')" "$(fmt "${R[$t:$s:p99]}" '%.3f')" "$cpu")"
    done
done

# ---------------------------------------------------------------- after the load
for t in baton haproxy nginx; do
    has_target "$t" || continue
    MEM[$t:after_load]=$(rss_kib "${PID_OF[$t]}")
done
BATON_STATUS=""
if has_target baton; then
    ip netns exec "$NS_P" curl -s --max-time 5 "http://127.0.0.1:$BATON_ADMIN_PORT/metrics" >"$TMP/baton-metrics.txt" || true
    BATON_STATUS=$(awk '/^baton_requests_total\{/ { match($0, /status="[0-9]+"/); st = substr($0, RSTART + 8, RLENGTH - 9); s = s sep st ": " $2; sep = ", " } END { print s }' "$TMP/baton-metrics.txt")
    for m in baton_load_shed_total baton_bad_requests_total baton_unrouted_requests_total baton_detect_timeouts_total; do
        v=$(awk -v m="$m" '$1 == m { print $2 }' "$TMP/baton-metrics.txt")
        [[ -z $v || $v == 0 ]] || note "baton: $m = $v"
    done
    [[ -z $BATON_STATUS ]] || [[ $BATON_STATUS =~ ^(200:\ [0-9]+)?$ ]] || note "baton responses by status: $BATON_STATUS"
    log "stopping baton (SIGTERM)"
    t0=$SECONDS
    stop_pid "${PID_OF[baton]}" 15
    [[ $STOP_RC == 0 ]] || { note "baton did not exit 0 on SIGTERM (exit: $STOP_RC)"; show_log baton; }
    log "baton exited ($STOP_RC) $((SECONDS - t0))s after SIGTERM"
    if grep -qiE 'error|panic' "$TMP/baton.log"; then
        note "baton logged errors: $(grep -iE 'error|panic' "$TMP/baton.log" | sort | uniq -c | sort -rn | head -n 3 | tr -s ' ' | tr '\n' ';')"
    fi
fi

# ---------------------------------------------------------------- report
commit=$(git -c safe.directory="$ROOT" -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -c safe.directory="$ROOT" -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    commit="$commit (working tree has uncommitted changes)"
fi
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
extra_env=$(env | grep -E '^BATON_' | grep -v '^BATON_BIN=' | sort | tr '\n' ' ' || true)

{
    echo "$SECTION_TITLE"
    echo
    echo "_Written by \`benches/load.sh\`; rerunning it rewrites only this section._"
    echo
    if [[ $QUICK == 1 ]]; then
        echo "**QUICK=1 smoke run: durations are too short for comparisons.**"
        echo
    fi
    echo "- Date: $START_DATE; commit: $commit"
    echo "- Machine: kernel $(uname -r), nproc $(nproc), ${cpu_model:-unknown CPU}; open-file limit $NOFILE_EFF; load average at start: $LOADAVG"
    echo "- Tools: $(nginx -v 2>&1 | sed 's/.*: //'), HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }'), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')"
    echo "- Topology: namespaces client, proxy, backend on one bridge (veth, $SUBNET.0/24), tcp_congestion_control=reno; upstream nginx (1 worker) serving static files"
    echo "- Proxies, one core each: baton \`BATON_WORKERS=1\`${extra_env:+ (env: \`${extra_env% }\`)}; HAProxy \`nbthread 1\`, \`maxconn 4096\`, \`http-reuse always\`; nginx \`worker_processes 1\`, upstream \`keepalive 64\`, \`proxy_max_temp_file_size 0\`"
    if ((RUNS == 1)); then
        echo "- Runs: 1 per target and size (RUNS=1): the tables show single runs, not medians"
    else
        echo "- Runs: **$RUNS per target and size; the tables show the median of the $RUNS runs**, each column on its own$( ((RUNS % 2 == 0)) && echo " (for an even count, the mean of the two middle values)"), and the ratios are computed from those medians. The runs were made in $RUNS rounds, each round running every target once, so the targets are interleaved. The per-run values follow each table, in run order; spread = (max − min) / median of req/s"
    fi
    echo "- Throughput: \`$WRK_TPUT\`$( ((WARMUP > 0)) && echo " after a ${WARMUP}s untimed warm-up (before every run)"); latency: \`$WRK_LAT\` (p50/p99 from its distribution)"
    echo "- CPU s / 10k req: the proxy's utime+stime+cutime+cstime (all its processes) over the throughput run, per 10 000 requests completed"
    for s in $SIZES; do
        echo
        echo "### ${SIZE_LABEL[$s]}"
        echo
        echo "| target | req/s | p50 ms | p99 ms | CPU s / 10k req |"
        echo "|---|---:|---:|---:|---:|"
        for t in $ALL_TARGETS; do
            has_target "$t" || continue
            cpu="–"
            [[ $t == direct ]] || cpu=$(fmt "${R[$t:$s:cpu]:-}" '%.3f')
            echo "| ${TARGET_NAME[$t]} | $(fmt "${R[$t:$s:rps]:-}" '%.0f') | $(fmt "${R[$t:$s:p50]:-}" '%.3f') | $(fmt "${R[$t:$s:p99]:-}" '%.3f') | $cpu |"
        done
        if has_target baton; then
            r=""
            for peer in haproxy nginx; do
                has_target "$peer" || continue
                r="${r:+$r; }baton / ${TARGET_NAME[$peer]}: throughput $(ratio "${R[baton:$s:rps]:-}" "${R[$peer:$s:rps]:-}"), p99 $(ratio "${R[baton:$s:p99]:-}" "${R[$peer:$s:p99]:-}"), CPU per request $(ratio "${R[baton:$s:cpu]:-}" "${R[$peer:$s:cpu]:-}")"
            done
            [[ -z $r ]] || {
                echo
                echo "Ratios: $r"
            }
        fi
        if ((RUNS > 1)); then
            echo
            echo "| per run | req/s | spread | p50 ms | p99 ms | CPU s / 10k req |"
            echo "|---|---:|---:|---:|---:|---:|"
            for t in $ALL_TARGETS; do
                has_target "$t" || continue
                cpu="–"
                [[ $t == direct ]] || cpu=$(runs_list "$t" "$s" cpu '%.3f')
                row="| ${TARGET_NAME[$t]} | $(runs_list "$t" "$s" rps '%.0f') | $(spread "$t" "$s")"
                row+=" | $(runs_list "$t" "$s" p50 '%.3f') | $(runs_list "$t" "$s" p99 '%.3f') | $cpu"
                echo "$row |"
            done
        fi
    done
    if [[ $MEMORY == 1 ]]; then
        echo
        echo "### Memory: idle keep-alive client connections"
        echo
        echo "Each connection made one \`GET /1k\` with keep-alive and then stayed open (benches/idle_conns.py, from the client namespace). RSS is VmRSS summed over the proxy's processes; idle = after startup and one warm-up request."
        echo
        echo "| proxy | RSS idle MiB | idle conns | RSS with conns MiB | KiB / conn | RSS after they closed MiB | RSS after the load runs MiB |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        for t in baton haproxy nginx; do
            has_target "$t" || continue
            echo "| ${TARGET_NAME[$t]} | $(mib "${MEM[$t:idle]:-}") | ${MEM[$t:n]:-} | $(mib "${MEM[$t:with]:-}") | ${MEM[$t:per_conn]:-} | $(mib "${MEM[$t:after_close]:-}") | $(mib "${MEM[$t:after_load]:-}") |"
        done
        if has_target baton && [[ -n ${MEM[baton:idle]:-} ]]; then
            echo
            echo "baton: RSS idle $(mib "${MEM[baton:idle]:-}") MiB, $(awk -v k="${MEM[baton:per_conn]:-}" 'BEGIN { printf "%.2f", k }') KiB per idle connection (${MEM[baton:n]:-} connections)."
        fi
        if ((PEER_IDLE_CONNS < IDLE_CONNS)) && { has_target haproxy || has_target nginx; }; then
            echo "HAProxy and nginx hold $PEER_IDLE_CONNS connections (their maxconn / worker_connections is 4096)."
        fi
    fi
    if [[ -n $BATON_STATUS ]]; then
        echo
        echo "baton responses by status over the whole run (/metrics): $BATON_STATUS"
    fi
    if ((${#NOTES[@]} > 0)); then
        echo
        echo "### Warnings"
        echo
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
    echo
} >"$TMP/section.md"

echo
cat "$TMP/section.md"

if [[ $WRITE_RESULTS == 1 ]]; then
    if [[ -f $RESULTS ]]; then
        awk -v title="$SECTION_TITLE" -v sec="$TMP/section.md" '
            function emit(  l) { while ((getline l < sec) > 0) print l; done = 1 }
            /^## / { skipping = 0 }
            /^## / && index($0, title) == 1 { if (!done) emit(); skipping = 1; next }
            !skipping { print }
            END { if (!done) { print ""; emit() } }' "$RESULTS" >"$TMP/results.md"
    else
        { printf '# baton benchmark results\n\n'; cat "$TMP/section.md"; } >"$TMP/results.md"
    fi
    cat "$TMP/results.md" >"$RESULTS"
    log "wrote the '$SECTION_TITLE' section of $RESULTS"
fi
