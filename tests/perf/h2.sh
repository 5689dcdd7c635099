#!/bin/bash
# HTTP/2 and gRPC proxy benchmark: direct vs weir vs Envoy vs nginx grpc_pass, in one run.
#
#   sudo tests/perf/h2.sh            (MODE=h2: small GETs, the default)
#   sudo MODE=grpc tests/perf/h2.sh  (gRPC unary: a pre-encoded request, a gRPC-shaped
#                                     response with `grpc-status: 0` trailers from nginx)
#
# Load: h2load, 100 concurrent streams over 4 connections (CONNS x STREAMS); every
# proxy speaks HTTP/2 on both legs (weir: h2c upstream; Envoy: http2_protocol_options;
# nginx: grpc_pass, its only HTTP/2 upstream). The upstream is nginx with a cleartext
# HTTP/2 listener (C, one worker: far faster than any proxy here).
#
# Method (design.md, "How to benchmark on a 2-core machine"):
# - the system under test (SUT) runs alone on CPU 1 with one worker; the load
#   generator (h2load) and the upstream (nginx, 1 KB responses) share CPU 0;
# - headline: SUT CPU time per request (utime+stime from /proc before/after);
# - latency: p50/p99 at a fixed rate every candidate sustains, minus direct;
# - max throughput is secondary (flagged when CPU 0 was saturated);
# - RUNS interleaved runs of DURATION seconds; median and spread reported.
# PROFILE=1 records weir's throughput run with perf into tests/perf/results/;
# PROFILE=fixed records its fixed-rate run instead (where per-request wake-ups show;
# PROFILE_EVENTS="-e EVENT" samples other events than cpu-clock);
# COUNT=1 prints weir's system calls (by name), context switches and wake-ups per request
# at the fixed rate (counts, which a busy machine changes far less than CPU times);
# COUNT_EVENTS="-e EVENT,..." counts those perf events instead (e.g. a uprobe on the allocator).
# BPF_STATS=1 prints the kernel time of weir's eBPF programs per request (fixed rate).
# CANDIDATES="direct weir" picks candidates; WEIR_ARGS="--steering nft" adds weir flags;
# FLOW_LOG=none runs weir without a flow log (default /dev/null: records rendered, discarded);
# CANDIDATES="direct weir weir-base" WEIR_BASE=/path/to/older/weir compares two builds in one run.
# weir gets 100 HTTP rules (the benchmark request matches the last one); Envoy gets
# the same 100 rules as RBAC policies; nginx proxies with no rules.
set -euo pipefail

DURATION=${DURATION:-20}
RUNS=${RUNS:-3}
CONNS=${CONNS:-4}
STREAMS=${STREAMS:-25}      # concurrent streams per connection (h2load -m)
MODE=${MODE:-h2}
case $MODE in h2|grpc) ;; *) echo "MODE is h2 or grpc"; exit 1 ;; esac
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
# A gRPC message frame (uncompressed, 32 bytes) as request and response body.
printf '\x00\x00\x00\x00\x20%s' "$(head -c 32 /dev/zero | tr '\0' 'g')" > "$WORK/grpc-req"
cp "$WORK/grpc-req" "$WORK/up/grpc-resp"
{ nginx_common "$WORK/up"; cat <<EOF
  server {
    listen 80 http2;
    http2_max_concurrent_streams 1000;
    location / { root $WORK/up; }
    # A gRPC-shaped answer: the static module refuses POST (405), so the call is
    # answered from the file by an internal redirect, with grpc-status trailers.
    location = /bench.Echo/Unary { error_page 405 =200 /grpc-resp; return 405; }
    location = /grpc-resp { internal; root $WORK/up; default_type application/grpc;
                            add_trailer grpc-status 0; }
  }
}
EOF
} > "$WORK/up/nginx.conf"
in_ns $SRV taskset -c 0 nginx -c "$WORK/up/nginx.conf" & PIDS+=($!)

# --- nginx grpc_pass (one worker; its HTTP/2 upstream) ------------------------------
{ nginx_common "$WORK/px"; cat <<EOF
  upstream backend { server 10.200.0.10:80; keepalive 64; keepalive_requests 10000000; }
  server { listen 8080 http2; http2_max_concurrent_streams 1000;
           location / { grpc_pass grpc://backend; } }
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
  if [ "$MODE" = grpc ]; then echo "        - {method: POST, path: '/bench\\.Echo/Unary'}"
  else echo "        - {method: GET, path: '/1k'}"; fi
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
    path=$(rule_path "$n"); method=GET
    if [ "$n" = 99 ]; then
      if [ "$MODE" = grpc ]; then path='/bench\\.Echo/Unary'; method=POST; else path=/1k; fi
    fi
    cat <<EOF
                  rule$n:
                    principals: [{any: true}]
                    permissions:
                    - and_rules:
                        rules:
                        - header: {name: ":method", string_match: {exact: $method}}
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
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {max_concurrent_streams: 1000}}
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.200.0.10, port_value: 80}}}}]}]
EOF
} > "$WORK/envoy.yaml"

# --- the request ------------------------------------------------------------------
if [ "$MODE" = grpc ]; then
  PATH_=/bench.Echo/Unary
  LOAD=(-d "$WORK/grpc-req" -H "content-type: application/grpc" -H "te: trailers")
else
  PATH_=/1k
  LOAD=()
fi
probe() {   # URL: one request answers 200
  if [ "$MODE" = grpc ]; then
    in_ns $CLI curl -sf --http2-prior-knowledge -o /dev/null --max-time 1 -X POST \
      --data-binary @"$WORK/grpc-req" -H "content-type: application/grpc" -H "te: trailers" "$1"
  else
    in_ns $CLI curl -sf --http2-prior-knowledge -o /dev/null --max-time 1 "$1"
  fi
}

# --- candidates -------------------------------------------------------------------
start_sut() {
  case $1 in
    direct) SUT_PID=; URL=http://10.200.0.10$PATH_ ;;
    weir|weir-base)
      if [ "$1" = weir-base ]; then start_weir_sut "${WEIR_BASE:?WEIR_BASE=path/to/an/older/weir for the weir-base candidate}"; else start_weir_sut; fi
      URL=http://10.200.0.10$PATH_ ;;
    envoy)
      start_envoy_sut
      URL=http://169.254.1.1:10000$PATH_ ;;
    nginx)
      in_ns $NODE taskset -c 1 nginx -c "$WORK/px/nginx.conf" & SUT_PID=$!
      URL=http://169.254.1.1:8080$PATH_ ;;
  esac
  for _ in $(seq 100); do
    probe "$URL" && return 0; sleep 0.1
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
  in_ns $CLI taskset -c 0 h2load "${LOAD[@]}" -c "$CONNS" -m "$STREAMS" -t 1 -D 2 "$URL" >/dev/null 2>&1 || true
  read -r b0 t0 < <(cpu0_busy); local ticks0; ticks0=$(cpu_ticks)
  local prof=
  if [ "${PROFILE:-0}" = 1 ] && [ "$c" = weir ]; then
    mkdir -p "$RESULTS"
    perf record -q -e cpu-clock -F 1999 -g -p "$(tree_pids "$SUT_PID" | tail -1)" -o "$RESULTS/weir.perf.data" >/dev/null 2>&1 & prof=$!
  fi
  local out; out=$(in_ns $CLI taskset -c 0 h2load "${LOAD[@]}" -c "$CONNS" -m "$STREAMS" -t 1 -D "$DURATION" "$URL" 2>&1)
  if [ -n "$prof" ]; then kill -INT "$prof"; wait "$prof" || true; fi
  local ticks1; ticks1=$(cpu_ticks); read -r b1 t1 < <(cpu0_busy)
  local reqs rps
  reqs=$(echo "$out" | awk '/^requests:/ {print $8}')
  rps=$(echo "$out" | awk '/^finished in/ {print $4}')
  local non2xx; non2xx=$(echo "$out" | awk '/^status codes:/ {print $5+$7+$9}')
  # nginx grpc_pass loses some calls under this load (502s, 0.01-0.3 % here):
  # noted on stderr, not fatal (an exit here would only leave this subshell).
  if [ "${non2xx:-0}" != 0 ]; then
    echo "note: $c answered $non2xx of $reqs requests with non-2xx" >&2
  fi
  local cpu_us=0
  [ -n "$SUT_PID" ] && cpu_us=$(awk -v d=$((ticks1-ticks0)) -v n="$reqs" -v hz="$TICK" 'BEGIN{printf "%.2f", d/hz*1e6/n}')
  local cpu0; cpu0=$(awk -v b=$((b1-b0)) -v t=$((t1-t0)) 'BEGIN{printf "%.0f", 100*b/t}')
  # Latency at a fixed rate: 10 clients, RATE/10 requests per second each.
  rm -f "$WORK/lat.log"
  local lt0; lt0=$(cpu_ticks); bpf_snapshot "$WORK/bpf0.json"
  if [ "${PROFILE:-0}" = fixed ] && [ "$c" = weir ]; then
    mkdir -p "$RESULTS"
    perf record -q ${PROFILE_EVENTS:--e cpu-clock -F 1999} -g -p "$(tree_pids "$SUT_PID" | tail -1)" -o "$RESULTS/weir-fixed.perf.data" >/dev/null 2>&1 & prof=$!
  fi
  local counter=
  if [ "${COUNT:-0}" = 1 ] && [ -n "$SUT_PID" ]; then
    if [ -n "${COUNT_EVENTS:-}" ]; then
      # shellcheck disable=SC2086
      perf stat -x, $COUNT_EVENTS -p "$(tree_pids "$SUT_PID" | tail -1)" -o "$WORK/count.txt" >/dev/null 2>&1 & counter=$!
    else
      perf trace -s -p "$(tree_pids "$SUT_PID" | tail -1)" -o "$WORK/count.txt" >/dev/null 2>&1 & counter=$!
    fi
  fi
  in_ns $CLI taskset -c 0 h2load "${LOAD[@]}" -c 10 -t 1 --rps $((RATE/10)) -D "$DURATION" \
    --log-file "$WORK/lat.log" "$URL" >/dev/null 2>&1
  if [ -n "$counter" ]; then
    kill -INT "$counter"; wait "$counter" || true
    # perf stat -x,: "count,unit,event,..."; perf trace -s: per thread,
    # "syscall calls errors total min avg max stddev".
    awk -F, -v n="$(wc -l < "$WORK/lat.log")" -v c="$c" '$3 != "" && $1 ~ /^[0-9.]+$/ {
        printf "count %s: %s %.2f per request\n", c, $3, $1 / n }' "$WORK/count.txt" >&2
    [ -z "${COUNT_EVENTS:-}" ] && awk -v n="$(wc -l < "$WORK/lat.log")" -v c="$c" '
      / \(([0-9]+)\), [0-9]+ events/ { thread = $1 }
      $2 ~ /^[0-9]+$/ && $1 ~ /^[a-z_0-9]+$/ { printf "count %s: %s %s %.2f per request\n", c, thread, $1, $2 / n }' \
      "$WORK/count.txt" >&2
  fi
  if [ -n "$prof" ]; then kill -INT "$prof"; wait "$prof" || true; prof=; fi
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
echo "weir HTTP/2 benchmark (MODE=$MODE): ${RUNS} x ${DURATION}s interleaved, ${CONNS} conns x ${STREAMS} streams (throughput), ${RATE} req/s (latency)"
echo "SUT on CPU 1 (1 worker); h2load + upstream nginx (HTTP/2) on CPU 0; $([ "$MODE" = grpc ] && echo "gRPC unary, 37-byte messages" || echo "1 KB responses"); 100 rules (weir, Envoy)"
printf "%-7s %-4s %10s %12s %14s %9s %9s %9s %6s %14s\n" cand run requests "req/s" "cpu_us/req" "p50_us" "p99_us" "rss_kB" "cpu0%" "cpu_us/req@fix"
http_rounds_and_summary
exit 0
