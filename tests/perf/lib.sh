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
