#!/bin/bash
# L3/L4 benchmark: connection rate and bulk throughput between two namespaces with
#   (a) no policy,
#   (b) weir's eBPF datapath with 10 000 L3/L4 rules in its maps,
#   (c) the same 10 000 rules as an iptables chain, the matching rule last,
#   (d) the same rules as one nftables set lookup.
# (c) and (d) accept established traffic through conntrack first, as weir's datapath
# does, so only new connections pay for the rules — which the connection rate measures.
#
#   sudo tests/perf/l4.sh      (or `make perf-l4`)
#
# Client tools (ab: connect/request/close; iperf3) run on CPU 0, the servers (nginx
# answering 204, iperf3 -s) on CPU 1; the datapath runs in the softirq of the sending
# CPU. RUNS interleaved runs of DURATION seconds; medians and spread.
set -euo pipefail

DURATION=${DURATION:-10}
RUNS=${RUNS:-3}
RULES=${RULES:-10000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WEIR=${WEIR:-$ROOT/target/release/weir}
P=wl4$$
WORK=$(mktemp -d /tmp/weir-perf-l4.XXXXXX)
BPF_ROOT=/sys/fs/bpf/weir-perf-l4-$$
# shellcheck source=tests/perf/lib.sh
. "$ROOT/tests/perf/lib.sh"

[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; exit 1; }
for t in "$WEIR" ab iperf3 iptables-restore nft nginx taskset nsenter; do
  command -v "$t" >/dev/null || [ -x "$t" ] || { echo "missing $t (run: make perf-l4)"; exit 1; }
done

trap cleanup_run EXIT

make_topology
in_ns $CLI sysctl -qw net.ipv4.tcp_tw_reuse=1
in_ns $CLI sysctl -qw net.ipv4.ip_local_port_range="1024 65000"

# --- servers on CPU 1 ---------------------------------------------------------------
mkdir -p "$WORK/ng"
cat > "$WORK/ng/nginx.conf" <<EOF
worker_processes 1; daemon off; user root;
pid $WORK/ng/nginx.pid; error_log $WORK/ng/error.log crit;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $WORK/ng/b; proxy_temp_path $WORK/ng/p;
  fastcgi_temp_path $WORK/ng/f; uwsgi_temp_path $WORK/ng/u; scgi_temp_path $WORK/ng/s;
  server { listen 80 reuseport backlog=4096; location / { return 204; } } }
EOF
in_ns $SRV taskset -c 1 nginx -c "$WORK/ng/nginx.conf" &
in_ns $SRV taskset -c 1 iperf3 -s -p 5201 --logfile "$WORK/iperf3-server.log" &
sleep 1

# --- the rules: RULES-1 sources that never connect, the client last ----------------
filler_ip() { echo "172.20.$(( $1 / 250 )).$(( $1 % 250 + 1 ))"; }
{
  cat <<EOF
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l4bench}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
EOF
  for i in $(seq 1 $((RULES - 1))); do
    echo "  - {fromCIDR: [$(filler_ip "$i")/32], toPorts: [{ports: [{port: '80', protocol: TCP}, {port: '5201', protocol: TCP}]}]}"
  done
  echo "  - {fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: '80', protocol: TCP}, {port: '5201', protocol: TCP}]}]}"
} > "$WORK/policy.yaml"
cat > "$WORK/endpoints.yaml" <<EOF
endpoints:
  - {name: server, ips: [10.200.0.10], labels: {app: server}}
  - {name: client, ips: [10.200.0.20], labels: {app: client}}
EOF
{
  echo "*filter"
  echo ":FORWARD DROP [0:0]"
  echo ":WEIRBENCH - [0:0]"
  echo "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
  echo "-A FORWARD -d 10.200.0.10/32 -j WEIRBENCH"
  for i in $(seq 1 $((RULES - 1))); do
    echo "-A WEIRBENCH -s $(filler_ip "$i")/32 -p tcp -m multiport --dports 80,5201 -j ACCEPT"
  done
  echo "-A WEIRBENCH -s 10.200.0.20/32 -p tcp -m multiport --dports 80,5201 -j ACCEPT"
  echo "COMMIT"
} > "$WORK/iptables.rules"
{
  echo "table inet weirbench {"
  echo "  set allowed { type ipv4_addr; elements = {"
  for i in $(seq 1 $((RULES - 1))); do echo "    $(filler_ip "$i"),"; done
  echo "    10.200.0.20 } }"
  echo "  chain bench_forward {"
  echo "    type filter hook forward priority 0; policy drop;"
  echo "    ct state established,related accept"
  echo "    ip daddr 10.200.0.10 ip saddr @allowed tcp dport { 80, 5201 } accept"
  echo "  }"
  echo "}"
} > "$WORK/nft.rules"

# --- variants -------------------------------------------------------------------------
WEIR_PID=
setup() {
  case $1 in
    none) ;;
    weir)
      in_ns $NODE "$WEIR" run --steering ebpf --policy "$WORK/policy.yaml" \
        --endpoints "$WORK/endpoints.yaml" --state-dir "$WORK/state" --bpf-root "$BPF_ROOT" --api-socket "$WORK/weir.sock" \
        --flow-log /dev/null 2>"$WORK/weir.log" & WEIR_PID=$!
      for _ in $(seq 300); do [ -e "$WORK/state/ready" ] && break; sleep 0.1; done
      [ -e "$WORK/state/ready" ] || { tail -5 "$WORK/weir.log" >&2; exit 1; } ;;
    iptables) in_ns $NODE iptables-restore < "$WORK/iptables.rules" ;;
    nftables) in_ns $NODE nft -f "$WORK/nft.rules" ;;
  esac
}
teardown() {
  case $1 in
    weir)
      kill -TERM "$WEIR_PID" 2>/dev/null || true; wait "$WEIR_PID" 2>/dev/null || true
      pkill -TERM -f "$WORK/policy.yaml" 2>/dev/null || true; sleep 0.5
      in_ns $NODE "$WEIR" cleanup --force --bpf-root "$BPF_ROOT" --api-socket "$WORK/weir.sock" >/dev/null 2>&1 || true ;;
    iptables)
      in_ns $NODE iptables -P FORWARD ACCEPT
      in_ns $NODE iptables -F FORWARD
      in_ns $NODE iptables -F WEIRBENCH
      in_ns $NODE iptables -X WEIRBENCH ;;
    nftables) in_ns $NODE nft delete table inet weirbench ;;
  esac
}
measure() {  # prints: connections/s bulk_Mbit/s
  local conn bulk
  conn=$(in_ns $CLI taskset -c 0 ab -q -t "$DURATION" -n 50000000 -c 32 http://10.200.0.10/ 2>&1 \
    | awk '/^Requests per second/ {print $4}')
  bulk=$(in_ns $CLI taskset -c 0 iperf3 -c 10.200.0.10 -p 5201 -t "$DURATION" -f m 2>&1 \
    | awk '/receiver/ {print $7}')
  echo "${conn:-0} ${bulk:-0}"
}

read -r -a VARIANTS <<<"${VARIANTS:-none weir iptables nftables}"
declare -A R
echo "weir L3/L4 benchmark: $RULES rules, $RUNS x ${DURATION}s interleaved; ab -c 32 (connect/request/close), iperf3"
printf "%-9s %-4s %14s %12s\n" variant run "conn/s" "bulk Mbit/s"
for run in $(seq "$RUNS"); do
  for v in "${VARIANTS[@]}"; do
    setup "$v"
    R[$v,$run]=$(measure)
    teardown "$v"
    read -r c b <<<"${R[$v,$run]}"
    printf "%-9s %-4s %14s %12s\n" "$v" "$run" "$c" "$b"
  done
done

col() { for run in $(seq "$RUNS"); do echo "${R[$1,$run]}" | awk -v i="$2" '{print $i}'; done; }
echo
echo "median (spread) over $RUNS runs"
declare -A M
for v in "${VARIANTS[@]}"; do
  M[$v,c]=$(col "$v" 1 | median); M[$v,b]=$(col "$v" 2 | median)
  printf "%-9s %12s (%s) conn/s %10s (%s) Mbit/s\n" "$v" "${M[$v,c]}" "$(col "$v" 1 | spread)" \
    "${M[$v,b]}" "$(col "$v" 2 | spread)"
done
awk -v w="${M[weir,c]:-0}" -v n="${M[none,c]:-0}" -v i="${M[iptables,c]:-0}" -v f="${M[nftables,c]:-0}" \
    -v wb="${M[weir,b]:-0}" -v nb="${M[none,b]:-0}" '
  function r(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "n/a" }
  BEGIN{
  printf "connection rate: weir/none = %s (target >= 0.9), weir/iptables = %s (target >= 2), weir/nftables = %s\n", r(w, n), r(w, i), r(w, f)
  printf "bulk throughput: weir/none = %s\n", r(wb, nb) }'
exit 0
