#!/bin/bash
# HTTP/1.1 proxy benchmark: direct vs weir vs Envoy vs nginx proxy_pass, in one run.
#
#   sudo tests/perf/http.sh          (or `make perf`, which builds and installs peers)
#
# Method (design.md, "How to benchmark on a 2-core machine"):
# - the system under test (SUT) runs alone on CPU 1 with one worker; the load
#   generator (h2load) and the upstream (nginx, 1 KB responses) share CPU 0;
# - headline: SUT CPU time per request (utime+stime from /proc before/after);
# - latency: p50/p99 at a fixed rate every candidate sustains, minus direct;
# - max throughput is secondary (flagged when CPU 0 was saturated);
# - RUNS interleaved runs of DURATION seconds; median and spread reported.
# PROFILE=1 records weir's throughput run with perf into tests/perf/results/.
# BPF_STATS=1 prints the kernel time of weir's eBPF programs per request (fixed rate).
# CANDIDATES="direct weir" picks candidates; WEIR_ARGS="--steering nft" adds weir flags;
# CANDIDATES="direct weir weir-base" WEIR_BASE=/path/to/older/weir compares two builds in one run.
# weir gets 100 HTTP rules (the benchmark request matches the last one); Envoy gets
# the same 100 rules as RBAC policies; nginx proxies with no rules.
set -euo pipefail

DURATION=${DURATION:-20}
RUNS=${RUNS:-3}
CONNS=${CONNS:-32}
RATE=${RATE:-2000}          # fixed total request rate for the latency runs
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WEIR=${WEIR:-$ROOT/target/release/weir}
ENVOY=${ENVOY:-$ROOT/.venv/bin/envoy}
RESULTS=${RESULTS:-$ROOT/tests/perf/results}
P=wperf$$
WORK=$(mktemp -d /tmp/weir-perf.XXXXXX)
TICK=$(getconf CLK_TCK)
PIDS=()

[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; exit 1; }
for t in "$WEIR" "$ENVOY" h2load nginx taskset nsenter; do
  command -v "$t" >/dev/null || [ -x "$t" ] || { echo "missing $t (run: make perf)"; exit 1; }
done

# shellcheck source=tests/perf/lib.sh
. "$ROOT/tests/perf/lib.sh"
BPF_ROOT=/sys/fs/bpf/weir-perf-$$
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${BPF_STATS_WAS:-}" ] && sysctl -qw kernel.bpf_stats_enabled="$BPF_STATS_WAS"
  cleanup_run
}
if [ "${BPF_STATS:-0}" = 1 ]; then
  BPF_STATS_WAS=$(sysctl -n kernel.bpf_stats_enabled); sysctl -qw kernel.bpf_stats_enabled=1
fi
trap cleanup EXIT

# --- topology: client and server namespaces routed through a node namespace ----
make_topology

# --- upstream: nginx with a 1 KB response, on CPU 0 -----------------------------
mkdir -p "$WORK/up" "$WORK/px"
head -c 1024 /dev/urandom > "$WORK/up/1k"
nginx_common() { cat <<EOF
worker_processes 1; daemon off; user root;
pid $1/nginx.pid; error_log $1/error.log crit;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  client_body_temp_path $1/b; proxy_temp_path $1/p; fastcgi_temp_path $1/f;
  uwsgi_temp_path $1/u; scgi_temp_path $1/s;
EOF
}
{ nginx_common "$WORK/up"; cat <<EOF
  server { listen 80; location / { root $WORK/up; } }
}
EOF
} > "$WORK/up/nginx.conf"
in_ns $SRV taskset -c 0 nginx -c "$WORK/up/nginx.conf" & PIDS+=($!)

# --- nginx proxy_pass (one worker) ------------------------------------------------
{ nginx_common "$WORK/px"; cat <<EOF
  upstream backend { server 10.200.0.10:80; keepalive 64; keepalive_requests 10000000; }
  server { listen 8080; location / { proxy_pass http://backend; proxy_http_version 1.1;
           proxy_set_header Connection ""; } }
}
EOF
} > "$WORK/px/nginx.conf"

# --- 100 HTTP rules: 99 that do not match, the benchmark request matches the last --
rule_path() { echo "/api/v$(( $1 % 3 ))/resource$1/[0-9]+"; }
{
  cat <<EOF
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
EOF
  for n in $(seq 0 98); do echo "        - {method: GET, path: '$(rule_path "$n")'}"; done
  echo "        - {method: GET, path: '/1k'}"
} > "$WORK/policy.yaml"
cat > "$WORK/endpoints.yaml" <<EOF
endpoints:
  - {name: server, ips: [10.200.0.10], labels: {app: server}}
  - {name: client, ips: [10.200.0.20], labels: {app: client}}
EOF
"$WEIR" policy validate "$WORK/policy.yaml" >/dev/null

{
  cat <<EOF
static_resources:
  listeners:
  - address: {socket_address: {address: 0.0.0.0, port_value: 10000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: backend}}]}]
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
EOF
  for n in $(seq 0 99); do
    path=$(rule_path "$n"); [ "$n" = 99 ] && path=/1k
    cat <<EOF
                  rule$n:
                    principals: [{any: true}]
                    permissions:
                    - and_rules:
                        rules:
                        - header: {name: ":method", string_match: {exact: GET}}
                        - url_path: {path: {safe_regex: {regex: "$path"}}}
EOF
  done
  cat <<EOF
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.200.0.10, port_value: 80}}}}]}]
EOF
} > "$WORK/envoy.yaml"

# --- candidates -------------------------------------------------------------------
start_sut() {
  case $1 in
    direct) SUT_PID=; URL=http://10.200.0.10/1k ;;
    weir|weir-base)
      if [ "$1" = weir-base ]; then start_weir_sut "${WEIR_BASE:?WEIR_BASE=path/to/an/older/weir for the weir-base candidate}"; else start_weir_sut; fi
      URL=http://10.200.0.10/1k ;;
    envoy)
      start_envoy_sut
      URL=http://169.254.1.1:10000/1k ;;
    nginx)
      in_ns $NODE taskset -c 1 nginx -c "$WORK/px/nginx.conf" & SUT_PID=$!
      URL=http://169.254.1.1:8080/1k ;;
  esac
  for _ in $(seq 100); do
    in_ns $CLI curl -sf -o /dev/null --max-time 1 "$URL" && return 0; sleep 0.1
  done
  { echo "$1 did not come up"; tail -20 "$WORK"/*.log 2>/dev/null; } >&2; exit 1
}
# Total run time (ns) of weir's eBPF programs, when BPF_STATS=1 turned the
# kernel's per-program accounting on (it costs a little on every program run).
bpf_snapshot() {   # FILE: weir's programs' run counts and times, as bpftool sees them
  [ "${BPF_STATS:-0}" = 1 ] || return 0
  bpftool -j prog show > "$1" 2>/dev/null || echo '[]' > "$1"
}

measure() {   # prints: reqs rps cpu_us_per_req p50_us p99_us rss_kb cpu0_pct fixed_rate_cpu_us_per_req
  local c=$1
  start_sut "$c"
  in_ns $CLI taskset -c 0 h2load --h1 -c "$CONNS" -t 1 -D 2 "$URL" >/dev/null 2>&1 || true
  read -r b0 t0 < <(cpu0_busy); local ticks0; ticks0=$(cpu_ticks)
  local prof=
  if [ "${PROFILE:-0}" = 1 ] && [ "$c" = weir ]; then
    mkdir -p "$RESULTS"
    perf record -q -e cpu-clock -F 1999 -g -p "$(tree_pids "$SUT_PID" | tail -1)" -o "$RESULTS/weir.perf.data" >/dev/null 2>&1 & prof=$!
  fi
  local out; out=$(in_ns $CLI taskset -c 0 h2load --h1 -c "$CONNS" -t 1 -D "$DURATION" "$URL" 2>&1)
  if [ -n "$prof" ]; then kill -INT "$prof"; wait "$prof" || true; fi
  local ticks1; ticks1=$(cpu_ticks); read -r b1 t1 < <(cpu0_busy)
  local reqs rps
  reqs=$(echo "$out" | awk '/^requests:/ {print $8}')
  rps=$(echo "$out" | awk '/^finished in/ {print $4}')
  local non2xx; non2xx=$(echo "$out" | awk '/^status codes:/ {print $5+$7+$9}')
  [ "${non2xx:-0}" = 0 ] || { echo "$c: non-2xx responses: $out" >&2; exit 1; }
  local cpu_us=0
  [ -n "$SUT_PID" ] && cpu_us=$(awk -v d=$((ticks1-ticks0)) -v n="$reqs" -v hz="$TICK" 'BEGIN{printf "%.2f", d/hz*1e6/n}')
  local cpu0; cpu0=$(awk -v b=$((b1-b0)) -v t=$((t1-t0)) 'BEGIN{printf "%.0f", 100*b/t}')
  # Latency at a fixed rate: 10 clients, RATE/10 requests per second each.
  rm -f "$WORK/lat.log"
  local lt0; lt0=$(cpu_ticks); bpf_snapshot "$WORK/bpf0.json"
  in_ns $CLI taskset -c 0 h2load --h1 -c 10 -t 1 --rps $((RATE/10)) -D "$DURATION" \
    --log-file "$WORK/lat.log" "$URL" >/dev/null 2>&1
  local lt1; lt1=$(cpu_ticks); bpf_snapshot "$WORK/bpf1.json"
  bpf_report "$c" "$WORK/bpf0.json" "$WORK/bpf1.json" "$(wc -l < "$WORK/lat.log")"
  local fixed_cpu=0
  [ -n "$SUT_PID" ] && fixed_cpu=$(awk -v d=$((lt1-lt0)) -v n="$(wc -l < "$WORK/lat.log")" -v hz="$TICK" 'BEGIN{printf "%.2f", d/hz*1e6/n}')
  local p50 p99
  read -r p50 p99 < <(awk -F'\t' '{print $3}' "$WORK/lat.log" | sort -n | awk '{a[NR]=$1} END{print a[int(NR*0.5)], a[int(NR*0.99)]}')
  local rss; rss=$(peak_rss_kb)
  stop_sut
  echo "$reqs $rps $cpu_us $p50 $p99 $rss $cpu0 $fixed_cpu"
}

read -r -a CANDIDATES <<< "${CANDIDATES:-direct weir envoy nginx}"
declare -A R
echo "weir HTTP/1.1 benchmark: ${RUNS} x ${DURATION}s interleaved, ${CONNS} conns (throughput), ${RATE} req/s (latency)"
echo "SUT on CPU 1 (1 worker); h2load + upstream nginx on CPU 0; 1 KB responses; 100 rules (weir, Envoy)"
printf "%-7s %-4s %10s %12s %14s %9s %9s %9s %6s %14s\n" cand run requests "req/s" "cpu_us/req" "p50_us" "p99_us" "rss_kB" "cpu0%" "cpu_us/req@fix"
http_rounds_and_summary
exit 0
