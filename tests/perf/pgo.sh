#!/bin/bash
# Trains the profile the release build is optimised with (profile-guided
# optimisation): builds an instrumented weir, runs it through the load scripts'
# own workloads — HTTP/1.1, HTTP/2, gRPC, DNS with FQDN learning, Kafka — and
# merges what it counted into pgo/weir.profdata (sparse: only code that ran).
#
#   sudo tests/perf/pgo.sh          (or `make pgo`, which installs llvm-profdata)
#
# The profile is checked in: `make release` (and every `make perf*`) builds with it.
# A profile older than the code still applies to the functions that did not
# change (rustc skips the others), so retrain after a large change to the data
# path. LLVM_PROFDATA picks the merger (Debian's llvm-19 reads the raw profiles of
# rustc's LLVM); DURATION (5) is each workload's length; OUT writes the profile
# elsewhere than pgo/weir.profdata.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LLVM_PROFDATA=${LLVM_PROFDATA:-/usr/lib/llvm-19/bin/llvm-profdata}
[ -x "$LLVM_PROFDATA" ] || { echo "missing $LLVM_PROFDATA (apt install llvm-19)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root: the workloads build network namespaces" >&2; exit 1; }
TARGET=$ROOT/target/pgo-train
# A fixed place for the raw profiles: the same RUSTFLAGS each time, so a rebuild
# is incremental.
RAW=$TARGET/profraw
mkdir -p "$RAW"

echo "building an instrumented weir (target/pgo-train)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$RAW" CARGO_TARGET_DIR="$TARGET" \
  cargo build -q --release -p weir-agent --bin weir)
# Only weir's own runs count: build scripts ran instrumented too.
rm -f "$RAW"/*.profraw "$RAW"/*.log

export WEIR=$TARGET/release/weir CANDIDATES=weir RUNS=1 DURATION=${DURATION:-5}
# "script MODE" (MODE matters to h2.sh only).
for w in "http.sh -" "h2.sh h2" "h2.sh grpc" "dns.sh -" "kafka.sh -"; do
  read -r script mode <<<"$w"
  echo "training: $script ${mode/#-/}"
  log=$RAW/$script-$mode.log
  MODE=${mode/#-/h2} "$ROOT/tests/perf/$script" > "$log" 2>&1 \
    || { echo "workload $script failed:" >&2; tail -20 "$log" >&2; exit 1; }
done

OUT=${OUT:-$ROOT/pgo/weir.profdata}
mkdir -p "$(dirname "$OUT")"
"$LLVM_PROFDATA" merge --sparse -o "$OUT" "$RAW"/*.profraw
echo "wrote $OUT ($(stat -c %s "$OUT") bytes)"
