#!/usr/bin/env bash
# Instructions per proxied request, user space, counted by callgrind (repeatable
# whatever else the machine does, unlike wall-clock figures on a shared VM).
#
#   benches/callgrind.sh [BATON_BINARY] [KEY=VALUE ...]
#
# nginx serves /1k on loopback; baton (BATON_WORKERS=1, static discovery, extra env
# from the arguments) runs under valgrind; one curl sends N keep-alive requests over
# one connection. Two runs, N=200 and N=1200: the difference in instructions over the
# 1000 extra requests is the per-request cost, free of startup and shutdown.
set -euo pipefail
cd "$(dirname "$0")/.."
baton=${1:-target/release/baton}
shift || true
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null; rm -rf "$work"' EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port)
head -c 1024 /dev/zero | tr '\0' x > "$work/1k"
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 100000;
    server { listen 127.0.0.1:$up; root $work; }
    client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
    uwsgi_temp_path $work; scgi_temp_path $work;
}
CONF
nginx -c "$work/nginx.conf"

run() {
    local n=$1 inbound admin pid
    inbound=$(port); admin=$(port)
    env BATON_WORKERS=1 BATON_LOG=warn \
        BATON_INBOUND_ADDR=127.0.0.1:$inbound BATON_ADMIN_ADDR=127.0.0.1:$admin \
        BATON_ROUTES='*=web' BATON_STATIC_SERVICES="web=127.0.0.1:$up" "${@:2}" \
        valgrind --tool=callgrind --callgrind-out-file="$work/cg.$n" -q "$baton" &
    pid=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break
        sleep 0.1
    done
    curl -sf -o /dev/null "http://127.0.0.1:$inbound/1k?[1-$n]"
    kill -TERM $pid
    wait $pid || true
    awk '/^summary:/ {print $2}' "$work/cg.$n"
    # CG_KEEP=PREFIX keeps the profiles (PREFIX.N) for callgrind_annotate.
    if [ -n "${CG_KEEP:-}" ]; then cp "$work/cg.$n" "$CG_KEEP.$n"; fi
}
a=$(run 200 "$@")
b=$(run 1200 "$@")
echo "instructions/request: $(( (b - a) / 1000 ))  ($baton $*)"
