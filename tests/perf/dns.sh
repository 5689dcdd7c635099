#!/bin/bash
# DNS proxy benchmark: direct to the resolver vs through weir vs through dnsdist
# (a plain forwarder), in one run.
#
#   sudo tests/perf/dns.sh          (or `make perf-dns`, which builds and installs peers)
#
# Method (design.md, "How to benchmark on a 2-core machine"):
# - the system under test (SUT) runs alone on CPU 1 with one worker; the load
#   generator (dnsperf) and the resolver (dnsmasq, answering from its own records)
#   share CPU 0;
# - headline: SUT CPU time per query (utime+stime from /proc before/after) at a
#   fixed rate every candidate sustains (RATE, dnsperf -Q);
# - latency: p50/p99 per query at that rate (dnsperf -v prints each query's
#   latency), minus direct's;
# - max throughput (dnsperf with many outstanding queries) is secondary;
# - RUNS interleaved runs of DURATION seconds; median and spread reported.
# weir gets 1 000 DNS rules (the benchmark names match the last one) and 100
# toFQDNs selectors (every answer selected: each one goes through the learner and
# its address into the kernel's ipcache); dnsdist forwards without rules or cache.
# CANDIDATES="direct weir" picks candidates (CANDIDATES="direct weir weir-base"
# WEIR_BASE=/path/to/older/weir compares two builds in one run); WEIR_ARGS adds weir
# flags, FLOW_LOG=none runs weir without a flow log (default /dev/null); PROFILE=1 records
# weir's fixed-rate run with perf into tests/perf/results/weir-dns.perf.data (PROFILE_CANDIDATE:
# another candidate's, into <candidate>-dns.perf.data; PROFILE_EVENTS: other events than cpu-clock); COUNT=1
# prints, per SUT and fixed-rate run, syscalls, context switches and wake-ups per query
# (perf stat over the SUT's threads) and each thread's voluntary switches per query:
# counts that a busy machine changes far less than CPU times (COUNT_EVENTS: other perf
# stat arguments). NOMAX=1 skips the
# max-throughput phase (its columns read 0).
set -euo pipefail

DURATION=${DURATION:-20}
RUNS=${RUNS:-3}
RATE=${RATE:-10000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WEIR=${WEIR:-$ROOT/target/release/weir}
P=wdns$$
WORK=$(mktemp -d /tmp/weir-perf-dns.XXXXXX)
TICK=$(getconf CLK_TCK)
PIDS=()

[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; exit 1; }
for t in "$WEIR" dnsperf dnsdist dnsmasq taskset nsenter; do
  command -v "$t" >/dev/null || [ -x "$t" ] || { echo "missing $t (run: make perf-dns)"; exit 1; }
done

# shellcheck source=tests/perf/lib.sh
. "$ROOT/tests/perf/lib.sh"
BPF_ROOT=/sys/fs/bpf/weir-perf-dns-$$
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  cleanup_run
}
trap cleanup EXIT

# --- topology: the client is an endpoint; the resolver (10.200.0.10) is not -------
make_topology

# --- the resolver: dnsmasq on CPU 0, 100 zones, every name answered -----------------
# name hNNN.zoneZ.bench. -> 10.202.Z.(NNN % 250 + 1): 250 distinct addresses per zone.
ZONES=100
# One client (dnsperf) resolves all ZONES x 250 selected names: its share of the FQDN
# cache must hold them (the default lets one client fill all but 8 192 of 32 768).
WEIR_ARGS="--fqdn-max-entries-per-client 32768 ${WEIR_ARGS:-}"
{
  echo "no-resolv"; echo "no-hosts"; echo "user=root"; echo "pid-file="
  echo "listen-address=10.200.0.10"; echo "bind-interfaces"; echo "cache-size=10000"
  for z in $(seq 0 $((ZONES - 1))); do
    echo "local=/zone$z.bench/"
    for h in $(seq 0 249); do echo "host-record=h$h.zone$z.bench,10.202.$z.$((h + 1)),300"; done
  done
} > "$WORK/dnsmasq.conf"
in_ns $SRV taskset -c 0 dnsmasq --no-daemon --conf-file="$WORK/dnsmasq.conf" 2>"$WORK/dnsmasq.log" & PIDS+=($!)

# The queries: every name of every zone, shuffled.
for z in $(seq 0 $((ZONES - 1))); do for h in $(seq 0 249); do echo "h$h.zone$z.bench A"; done; done \
  | shuf --random-source=<(yes) > "$WORK/queries.txt"

# --- weir: 1 000 DNS rules, 100 toFQDNs selectors ----------------------------------
{
  cat <<EOF
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-dns}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [10.200.0.10/32]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules:
        dns:
EOF
  for n in $(seq 0 998); do echo "        - {matchPattern: 'svc$n.*.cluster$((n % 7)).example.'}"; done
  echo "        - {matchPattern: '*.*.bench'}"
  echo "  - toFQDNs:"
  for z in $(seq 0 $((ZONES - 1))); do echo "    - {matchPattern: '*.zone$z.bench'}"; done
  cat <<EOF
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
EOF
} > "$WORK/policy.yaml"
cat > "$WORK/endpoints.yaml" <<EOF
endpoints:
  - {name: client, ips: [10.200.0.20], labels: {app: client}}
EOF
"$WEIR" policy validate "$WORK/policy.yaml" >/dev/null

cat > "$WORK/dnsdist.conf" <<EOF
setLocal('169.254.1.1:53')
-- Its default health check asks for a.root-servers.net, which this offline resolver cannot answer.
newServer({address='10.200.0.10:53', checkName='h1.zone1.bench.'})
setServerPolicy(firstAvailable)
EOF

# --- candidates -------------------------------------------------------------------
start_sut() {
  case $1 in
    direct) SUT_PID=; SERVER=10.200.0.10 ;;
    weir|weir-base)
      if [ "$1" = weir-base ]; then start_weir_sut "${WEIR_BASE:?WEIR_BASE=path/to/an/older/weir for the weir-base candidate}"; else start_weir_sut; fi
      SERVER=10.200.0.10 ;;
    dnsdist)
      in_ns $NODE taskset -c 1 dnsdist --supervised --disable-syslog -C "$WORK/dnsdist.conf" \
        >"$WORK/dnsdist.log" 2>&1 & SUT_PID=$!
      SERVER=169.254.1.1 ;;
  esac
  for _ in $(seq 100); do
    [ "$(in_ns $CLI dig @"$SERVER" +short +time=1 +tries=1 h1.zone1.bench A 2>/dev/null)" = 10.202.1.2 ] && return 0
    sleep 0.1
  done
  { echo "$1 did not come up"; tail -20 "$WORK"/*.log 2>/dev/null; } >&2; exit 1
}

# thread_switches PID: "tid name voluntary involuntary cpu_ticks" per thread, sorted for join.
thread_switches() {
  local t
  for t in /proc/"$1"/task/*; do
    echo "${t##*/} $(tr ' ' _ < "$t/comm") $(awk '/^voluntary_ctxt/ {v=$2} /^nonvoluntary_ctxt/ {n=$2} END {print v, n}' "$t/status") $(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')"
  done 2>/dev/null | sort
}

measure() {   # prints: max_qps cpu_us_per_q@max p50_us p99_us cpu_us_per_q@rate lost@rate cpu0_pct
  local c=$1
  start_sut "$c"
  # Warm-up: every name once (weir learns every address).
  in_ns $CLI taskset -c 0 dnsperf -s "$SERVER" -d "$WORK/queries.txt" -n 1 -c 8 -q 200 >"$WORK/warmup.txt" 2>&1 || true
  [ "${COUNT:-0}" = 1 ] && grep -E "Queries (sent|completed|lost)|Response codes" "$WORK/warmup.txt" | sed "s/^/count $c: warm-up /" >&2
  # Max throughput.
  read -r b0 t0 < <(cpu0_busy); local k0; k0=$(cpu_ticks)
  local out=$'Queries completed: 1\nQueries per second: 0'
  [ "${NOMAX:-0}" = 1 ] || out=$(in_ns $CLI taskset -c 0 dnsperf -s "$SERVER" -d "$WORK/queries.txt" -l "$DURATION" -c 8 -q 500 2>&1)
  local k1; k1=$(cpu_ticks); read -r b1 t1 < <(cpu0_busy)
  local done_q qps
  done_q=$(echo "$out" | awk '/Queries completed:/ {print $3}')
  qps=$(echo "$out" | awk '/Queries per second:/ {printf "%.0f", $4}')
  local cpu_max=0
  [ -n "$SUT_PID" ] && [ "${NOMAX:-0}" != 1 ] && cpu_max=$(awk -v d=$((k1-k0)) -v n="$done_q" -v hz="$TICK" 'BEGIN{printf "%.2f", d/hz*1e6/n}')
  local cpu0; cpu0=$(awk -v b=$((b1-b0)) -v t=$((t1-t0)) 'BEGIN{printf "%.0f", 100*b/t}')
  # Fixed rate, every query's latency.
  local prof=
  if [ "${PROFILE:-0}" = 1 ] && [ "$c" = "${PROFILE_CANDIDATE:-weir}" ]; then
    mkdir -p "$ROOT/tests/perf/results"
    perf record -q ${PROFILE_EVENTS:--e cpu-clock -F 1999} -g -p "$(tree_pids "$SUT_PID" | tail -1)" \
      -o "$ROOT/tests/perf/results/$c-dns.perf.data" >/dev/null 2>&1 & prof=$!
  fi
  local counter= sut=
  if [ "${COUNT:-0}" = 1 ] && [ -n "$SUT_PID" ]; then
    sut=$(tree_pids "$SUT_PID" | tail -1)
    thread_switches "$sut" > "$WORK/switches0"
    # shellcheck disable=SC2086
    perf stat -x, ${COUNT_EVENTS:--e raw_syscalls:sys_enter,context-switches,sched:sched_wakeup,task-clock} -p "$sut" \
      -o "$WORK/count.txt" >/dev/null 2>&1 & counter=$!
  fi
  local f0; f0=$(cpu_ticks)
  in_ns $CLI taskset -c 0 dnsperf -s "$SERVER" -d "$WORK/queries.txt" -l "$DURATION" -c 8 -Q "$RATE" -v \
    > "$WORK/lat.txt" 2>&1 || true
  local f1; f1=$(cpu_ticks)
  if [ -n "$prof" ]; then kill -INT "$prof"; wait "$prof" || true; fi
  local n_fixed lost
  n_fixed=$(awk '/Queries completed:/ {print $3}' "$WORK/lat.txt")
  if [ -n "$counter" ]; then
    kill -INT "$counter"; wait "$counter" || true
    thread_switches "$sut" > "$WORK/switches1"
    {
      awk -F, -v n="$n_fixed" -v c="$c" '$3 != "" && $1 ~ /^[0-9.]+$/ {
        printf "count %s: %s %.2f per query\n", c, $3, $1 / n }' "$WORK/count.txt"
      join "$WORK/switches0" "$WORK/switches1" | awk -v n="$n_fixed" -v c="$c" -v hz="$TICK" '$7 + $8 + $9 > $3 + $4 + $5 {
        printf "count %s: thread %s voluntary switches %.2f, involuntary %.2f, CPU %.1f us per query\n", c, $2, ($7 - $3) / n, ($8 - $4) / n, ($9 - $5) / hz * 1e6 / n }'
    } >&2
  fi
  lost=$(awk '/Queries lost:/ {print $3}' "$WORK/lat.txt")
  local cpu_fixed=0
  [ -n "$SUT_PID" ] && cpu_fixed=$(awk -v d=$((f1-f0)) -v n="$n_fixed" -v hz="$TICK" 'BEGIN{printf "%.2f", d/hz*1e6/n}')
  # dnsperf -v: "> NOERROR h1.zone1.bench A 0.000123" (seconds).
  local p50 p99
  read -r p50 p99 < <(awk '/^> / {printf "%.0f\n", $NF * 1e6}' "$WORK/lat.txt" | sort -n \
    | awk '{a[NR]=$1} END{print a[int(NR*0.5)], a[int(NR*0.99)]}')
  [ "${COUNT:-0}" = 1 ] && cp "$WORK/weir.log" /tmp/weir-dns-count.log 2>/dev/null
  stop_sut
  echo "$qps $cpu_max $p50 $p99 $cpu_fixed ${lost:-?} $cpu0"
}

read -r -a CANDIDATES <<< "${CANDIDATES:-direct weir dnsdist}"
declare -A R
echo "weir DNS benchmark: ${RUNS} x ${DURATION}s interleaved; max rate with 500 outstanding, latency at ${RATE} q/s"
echo "SUT on CPU 1 (1 worker); dnsperf + dnsmasq on CPU 0; weir: 1000 DNS rules, ${ZONES} toFQDNs selectors"
printf "%-8s %-4s %10s %14s %8s %8s %16s %10s %6s\n" cand run "max q/s" "cpu_us/q@max" p50_us p99_us "cpu_us/q@rate" "lost@rate" "cpu0%"
for run in $(seq "$RUNS"); do
  for c in "${CANDIDATES[@]}"; do
    line=$(measure "$c")
    R[$c,$run]=$line
    read -r qps cpu p50 p99 fcpu lost cpu0 <<<"$line"
    printf "%-8s %-4s %10s %14s %8s %8s %16s %10s %6s\n" "$c" "$run" "$qps" "$cpu" "$p50" "$p99" "$fcpu" "$lost" "$cpu0"
  done
done

echo
echo "median (spread) over $RUNS runs"
printf "%-8s %22s %20s %20s %10s %10s\n" cand "max q/s" "cpu_us/q@max" "cpu_us/q@rate" "p50+_us" "p99+_us"
d50=0; d99=0
if [ -n "${R[direct,1]:-}" ]; then d50=$(col direct 3 | median); d99=$(col direct 4 | median); fi
declare -A MED
for c in "${CANDIDATES[@]}"; do
  qps=$(col "$c" 1 | median); cpu=$(col "$c" 2 | median); fcpu=$(col "$c" 5 | median)
  p50=$(col "$c" 3 | median); p99=$(col "$c" 4 | median)
  MED[$c,qps]=$qps; MED[$c,cpu]=$cpu; MED[$c,fcpu]=$fcpu
  printf "%-8s %12s (%s) %9s (%s) %9s (%s) %10s %10s\n" "$c" "$qps" "$(col "$c" 1 | spread)" "$cpu" "$(col "$c" 2 | spread)" \
    "$fcpu" "$(col "$c" 5 | spread)" "$((p50 - d50))" "$((p99 - d99))"
done
echo
if [ -n "${MED[weir,fcpu]:-}" ] && [ -n "${MED[dnsdist,fcpu]:-}" ]; then
  awk -v w="${MED[weir,fcpu]}" -v d="${MED[dnsdist,fcpu]}" -v wm="${MED[weir,cpu]}" -v dm="${MED[dnsdist,cpu]}" \
      -v wq="${MED[weir,qps]}" -v dq="${MED[dnsdist,qps]}" -v rate="$RATE" 'BEGIN{
    printf "CPU per query at %d q/s: weir/dnsdist = %.2f (target <= 1)\n", rate, w/d
    printf "CPU per query at max: weir/dnsdist = %.2f; max q/s: weir/dnsdist = %.2f (target >= 1)\n", wm/dm, wq/dq }'
fi
if [ -n "${MED[weir-base,fcpu]:-}" ]; then
  awk -v w="${MED[weir,fcpu]}" -v b="${MED[weir-base,fcpu]}" -v wm="${MED[weir,cpu]}" -v bm="${MED[weir-base,cpu]}" \
      -v rate="$RATE" -v base="$WEIR_BASE" 'BEGIN{
    printf "CPU per query, weir/weir-base (%s): %.2f at %d q/s, %.2f at max\n", base, w/b, rate, wm/bm }'
fi
[ -n "${R[direct,1]:-}" ] && [ -n "${R[weir,1]:-}" ] && \
  echo "latency added by weir at ${RATE} q/s: p50 +$(( $(col weir 3 | median) - d50 )) us (target <= 50)"
for c in "${CANDIDATES[@]}"; do
  for run in $(seq "$RUNS"); do
    cpu0=$(echo "${R[$c,$run]}" | awk '{print $7}')
    if [ "$cpu0" -ge 90 ]; then echo "note: CPU 0 was at ${cpu0}% in $c run $run: its max rate is load-generator bound"; fi
  done
done | sort -u
exit 0
