# shellcheck shell=bash
# benches/lib.sh: helpers shared by the load scripts (sourced, not run): logging,
# the processes a script starts (tracking, stopping, liveness, CPU ticks) and wrk output.

BENCH_NAME=${BENCH_NAME:-${0##*/}}
NOTES=()

log() { printf '[%s %s] %s\n' "$BENCH_NAME" "$(date +%T)" "$*" >&2; }
die() {
    printf '\n[%s] ERROR: %s\n' "$BENCH_NAME" "$*" >&2
    exit 1
}
note() {
    log "WARNING: $*"
    NOTES+=("$*")
}
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
proc_state() { awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null || true; }
alive() {
    local st
    st=$(proc_state "$1")
    [[ -n $st && $st != Z && $st != X ]]
}
untrack() {
    local p keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
# stop_pid PID [grace seconds]: SIGTERM, wait, SIGKILL after the grace; sets STOP_RC.
stop_pid() {
    local pid=$1 grace=${2:-5} i
    STOP_RC=0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        STOP_RC=killed
    fi
    local wrc=0
    wait "$pid" 2>/dev/null || wrc=$?
    [[ $STOP_RC == killed ]] || STOP_RC=$wrc
    untrack "$pid"
}
proc_tree() {
    local c
    echo "$1"
    for c in $(pgrep -P "$1" || true); do proc_tree "$c"; done
}
# cpu_ticks PID...: utime+stime+cutime+cstime (fields 14-17 of /proc/PID/stat), summed.
cpu_ticks() {
    local p total=0 t
    for p in "$@"; do
        t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$p/stat" 2>/dev/null) || t=""
        [[ -n $t ]] || { log "WARNING: process $p vanished during a CPU measurement"; continue; }
        total=$((total + t))
    done
    echo "$total"
}
show_log() { [[ -f $TMP/$1.log ]] && { echo "--- last lines of $1.log:" >&2; tail -n 40 "$TMP/$1.log" >&2; }; }
describe_exit() {
    if (($1 > 128)); then echo "killed by signal $(($1 - 128)) (SIG$(kill -l $(($1 - 128)) 2>/dev/null))"; else echo "exited with status $1"; fi
}
# require_alive NAME PID: die (with NAME's log and exit status) unless PID is running.
require_alive() {
    alive "$2" && return 0
    local rc=0
    wait "$2" 2>/dev/null || rc=$?
    untrack "$2"
    show_log "$1"
    die "$1 (pid $2) is not running: it $(describe_exit "$rc")"
}
# wait_until SECONDS NAME PID CMD...: retry CMD until it succeeds; NAME's process must stay up.
wait_until() {
    local secs=$1 name=$2 pid=$3 deadline
    shift 3
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        require_alive "$name" "$pid"
        ((SECONDS < deadline)) || { show_log "$name"; die "$name not ready after ${secs}s: $*"; }
        sleep 0.2
    done
}
# wrk_errors FILE: "non-2xx N; socket errors ..." or empty.
wrk_errors() {
    local out="" n
    n=$(awk -F': *' '/Non-2xx or 3xx responses/ { print $2 }' "$1")
    [[ -z $n ]] || out="non-2xx/3xx responses: $n"
    n=$(grep -o 'Socket errors:.*' "$1" || true)
    [[ -z $n ]] || out="${out:+$out; }${n,}"
    echo "$out"
}
# wrk_pct_ms FILE PCT: a percentile of the --latency table, in ms (wrk prints us/ms/s/m/h).
wrk_pct_ms() {
    awk -v p="$2%" '$1 == p {
        v = $2; u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : (u == "h") ? 3600000 : -1
        if (f < 0) print "NaN"; else printf "%.3f\n", (v + 0) * f
        exit }' "$1"
}
# median VALUE...: the median of the numeric values (the mean of the two middle ones for an
# even count); values that are empty or NaN are left out; NaN if none is left.
median() {
    printf '%s\n' "$@" | awk '$1 ~ /^[0-9.eE+-]+$/ { print $1 }' | sort -g |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) print "NaN"
            else if (NR % 2) printf "%.4f\n", v[(NR + 1) / 2]
            else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
