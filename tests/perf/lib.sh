# Shared by the perf scripts: a client and a server namespace routed through a node
# namespace (like the e2e lab), run helpers and cleanup. Source it after setting P.

in_ns() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" -- "$@"; }

NODE=$P-node CLI=$P-client SRV=$P-server

# make_topology: node, client (10.200.0.20) and server (10.200.0.10) namespaces; host
# veths pv0 (client) and pv1 (server) in the node, which answers as 169.254.1.1.
make_topology() {
  ip netns add $NODE; ip netns add $CLI; ip netns add $SRV
  in_ns $NODE ip link set lo up
  in_ns $NODE sysctl -qw net.ipv4.ip_forward=1
  local i=0 pair ns ip hif
  for pair in "$CLI:10.200.0.20" "$SRV:10.200.0.10"; do
    ns=${pair%%:*} ip=${pair##*:} hif=pv$i; i=$((i+1))
    in_ns $NODE ip link add $hif type veth peer name eth0 netns "$ns"
    in_ns "$ns" ip link set lo up
    in_ns "$ns" ip addr add "$ip/32" dev eth0
    in_ns "$ns" ip link set eth0 up
    in_ns "$ns" ip route add 169.254.1.1 dev eth0 scope link
    in_ns "$ns" ip route add default via 169.254.1.1 dev eth0
    in_ns $NODE ip addr add 169.254.1.1/32 dev $hif
    in_ns $NODE ip link set $hif up
    in_ns $NODE ip route add "$ip/32" dev $hif
  done
}

remove_topology() {
  # Whatever still runs in a namespace first: a process started through `in_ns` is not
  # the child the script recorded (tansu brokers outlived kafka.sh runs, 2-3 GB each).
  local ns
  for ns in $CLI $SRV $NODE; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  for ns in $CLI $SRV $NODE; do ip netns del "$ns" 2>/dev/null || true; done
}

# Every process a run starts names its work directory on its command line.
kill_work_processes() {
  pkill -TERM -f "$1" 2>/dev/null || true
  sleep 0.5
  pkill -KILL -f "$1" 2>/dev/null || true
}

# cleanup_run: stop everything a run started, remove weir's pins, the namespaces and
# the work directory. Needs WORK, WEIR and BPF_ROOT.
cleanup_run() {
  kill_work_processes "$WORK"
  in_ns $NODE "$WEIR" cleanup --force --bpf-root "$BPF_ROOT" --api-socket "$WORK/weir.sock" >/dev/null 2>&1 || true
  remove_topology
  rm -rf "$WORK"
}

median() { sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
spread() { sort -g | awk 'NR==1{lo=$1} {hi=$1} END{printf "%s-%s", lo, hi}'; }

# The system under test: SUT_PID is set by each script's start_sut (empty for
# `direct`). stop_sut ends it and its children and removes weir's datapath (a
# stopped weir leaves its eBPF programs enforcing) before the next candidate runs.
SUT_PID=
stop_sut() {
  [ -n "$SUT_PID" ] || return 0
  if [ "${DEBUG:-0}" = 1 ]; then tail -5 "$WORK"/*.log >&2 2>/dev/null || true; fi
  pkill -TERM -P "$SUT_PID" 2>/dev/null || true; kill -TERM "$SUT_PID" 2>/dev/null || true
  wait "$SUT_PID" 2>/dev/null || true
  in_ns $NODE "$WEIR" cleanup --bpf-root "$BPF_ROOT" --api-socket "$WORK/weir.sock" >/dev/null 2>&1 || true
  sleep 0.5
}
tree_pids() { local p=$1; echo "$p"; for c in $(pgrep -P "$p"); do tree_pids "$c"; done; }
# CPU ticks (utime+stime) of the SUT and its children; 0 without one.
cpu_ticks() {
  [ -n "$SUT_PID" ] || { echo 0; return; }
  local t=0
  for p in $(tree_pids "$SUT_PID"); do
    read -r -a f < "/proc/$p/stat" 2>/dev/null || continue
    t=$(( t + f[13] + f[14] ))
  done
  echo $t
}
# CPU 0's busy and total ticks (is the load generator's CPU saturated?).
cpu0_busy() { awk '/^cpu0 / {print $2+$3+$4+$6+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
# col CANDIDATE FIELD: that field of every run's result line (R[cand,run], RUNS).
col() { local c=$1 i=$2; for run in $(seq "$RUNS"); do echo "${R[$c,$run]}" | awk -v i="$i" '{print $i}'; done; }

peak_rss_kb() {
  [ -n "$SUT_PID" ] || { echo 0; return; }
  local m=0
  for p in $(tree_pids "$SUT_PID"); do
    v=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    [ "${v:-0}" -gt "$m" ] && m=$v
  done
  echo $m
}

bpf_report() {    # CANDIDATE BEFORE AFTER REQUESTS: per-program runs and ns per request
  [ "${BPF_STATS:-0}" = 1 ] || return 0
  python3 - "$@" <<'PY' >&2
import json, sys
cand, before, after, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) or 1
def load(f):
    out = {}
    for p in json.load(open(f)):
        if p.get("name", "").startswith("weir_"):
            c, t = out.get(p["name"], (0, 0))
            out[p["name"]] = (c + p.get("run_cnt", 0), t + p.get("run_time_ns", 0))
    return out
b, a = load(before), load(after)
total = 0
parts = []
for name in sorted(a):
    c = a[name][0] - b.get(name, (0, 0))[0]
    t = a[name][1] - b.get(name, (0, 0))[1]
    total += t
    if c:
        parts.append(f"{name} {c / n:.1f} runs x {t / c:.0f} ns")
print(f"{cand}: eBPF {total / n:.0f} ns per request: " + "; ".join(parts))
PY
}

# start_envoy_sut: Envoy ($ENVOY) on CPU 1 in the node namespace with $WORK/envoy.yaml,
# one worker; sets SUT_PID (callers wait for its listener).
start_envoy_sut() {
  in_ns $NODE taskset -c 1 "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 -l error \
    --base-id $$ --disable-hot-restart 2>"$WORK/envoy.log" & SUT_PID=$!
}

# start_weir_sut [BINARY]: weir (default $WEIR) on CPU 1 in the node namespace with
# $WORK/policy.yaml and $WORK/endpoints.yaml, WEIR_WORKERS workers (1), flows to
# /dev/null, WEIR_ARGS added; sets SUT_PID and returns once weir is ready. A weir that
# did not start stops the run: a URL that still answers directly must not be measured
# as weir.
start_weir_sut() {
  local bin=${1:-$WEIR}
  rm -rf "$WORK/state"
  in_ns $NODE taskset -c 1 "$bin" run --policy "$WORK/policy.yaml" --endpoints "$WORK/endpoints.yaml" \
    --workers "${WEIR_WORKERS:-1}" --state-dir "$WORK/state" --bpf-root "$BPF_ROOT" --api-socket "$WORK/weir.sock" --flow-log "${FLOW_LOG:-/dev/null}" ${WEIR_ARGS:-} \
    2>"$WORK/weir.log" & SUT_PID=$!
  for _ in $(seq 100); do [ -e "$WORK/state/ready" ] && break; sleep 0.1; done
  [ -e "$WORK/state/ready" ] || { echo "weir did not start:"; tail -5 "$WORK/weir.log"; exit 1; } >&2
}

# http_rounds_and_summary: RUNS interleaved rounds of measure() over CANDIDATES (each
# prints "reqs rps cpu_us/req p50 p99 rss_kB cpu0% cpu_us/req@fixed"), then medians,
# spreads and the ratios to Envoy, nginx, weir-base and direct (http.sh and h2.sh).
http_rounds_and_summary() {
  for run in $(seq "$RUNS"); do
    for c in "${CANDIDATES[@]}"; do
      line=$(measure "$c")
      R[$c,$run]=$line
      read -r reqs rps cpu p50 p99 rss cpu0 fcpu <<<"$line"
      printf "%-7s %-4s %10s %12s %14s %9s %9s %9s %6s %14s\n" "$c" "$run" "$reqs" "$rps" "$cpu" "$p50" "$p99" "$rss" "$cpu0" "$fcpu"
    done
  done

  # --- medians, spreads, ratios -------------------------------------------------------
  echo
  echo "median (spread) over $RUNS runs"
  printf "%-7s %22s %20s %20s %14s %14s %9s\n" cand "req/s" "cpu_us/req@max" "cpu_us/req@fixed" "p50+_us" "p99+_us" "rss_kB"
  # Latency is reported over direct's; without a direct run, as measured.
  d50=0; d99=0
  if [ -n "${R[direct,1]:-}" ]; then d50=$(col direct 4 | median); d99=$(col direct 5 | median); fi
  declare -gA MED
  for c in "${CANDIDATES[@]}"; do
    rps=$(col "$c" 2 | median); cpu=$(col "$c" 3 | median); fcpu=$(col "$c" 8 | median)
    MED[$c,fcpu]=$fcpu
    p50=$(col "$c" 4 | median); p99=$(col "$c" 5 | median); rss=$(col "$c" 6 | median)
    MED[$c,rps]=$rps; MED[$c,cpu]=$cpu
    printf "%-7s %12s (%s) %9s (%s) %9s (%s) %14s %14s %9s\n" "$c" "$rps" "$(col "$c" 2 | spread)" "$cpu" "$(col "$c" 3 | spread)" \
      "$fcpu" "$(col "$c" 8 | spread)" \
      "$((p50 - d50))" "$((p99 - d99))" "$rss"
  done
  echo
  [ -n "${MED[envoy,cpu]:-}" ] && [ -n "${MED[nginx,cpu]:-}" ] && \
  awk -v w="${MED[weir,cpu]}" -v e="${MED[envoy,cpu]}" -v n="${MED[nginx,cpu]}" \
      -v wf="${MED[weir,fcpu]}" -v ef="${MED[envoy,fcpu]}" -v nf="${MED[nginx,fcpu]}" -v rate="$RATE" \
      -v wr="${MED[weir,rps]}" -v dr="${MED[direct,rps]}" -v er="${MED[envoy,rps]}" 'BEGIN{
    printf "CPU per request at %d req/s (same load for all): weir/Envoy = %.2f (target <= 0.5), weir/nginx = %.2f\n", rate, wf/ef, wf/nf
    printf "CPU per request at max throughput: weir/Envoy = %.2f, weir/nginx = %.2f\n", w/e, w/n
    printf "throughput: weir/direct = %.2f, weir/Envoy = %.2f\n", wr/dr, wr/er }'
  if [ -n "${MED[weir-base,fcpu]:-}" ]; then
    awk -v w="${MED[weir,fcpu]}" -v b="${MED[weir-base,fcpu]}" -v wm="${MED[weir,cpu]}" -v bm="${MED[weir-base,cpu]}" \
        -v rate="$RATE" -v base="$WEIR_BASE" 'BEGIN{
      printf "CPU per request, weir/weir-base (%s): %.2f at %d req/s, %.2f at max\n", base, w/b, rate, wm/bm }'
  fi
  [ -n "${R[direct,1]:-}" ] && \
  echo "latency added by weir at ${RATE} req/s: p50 +$(( $(col weir 4 | median) - d50 )) us (target <= 50), p99 +$(( $(col weir 5 | median) - d99 )) us (target <= 200)"
  for c in "${CANDIDATES[@]}"; do
    for run in $(seq "$RUNS"); do
      cpu0=$(echo "${R[$c,$run]}" | awk '{print $7}')
      if [ "$cpu0" -ge 90 ]; then echo "note: CPU 0 was at ${cpu0}% in $c run $run: its max throughput is load-generator bound"; fi
    done
  done | sort -u
}
