# Overlay: the two commands that matter are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: all deps build release test unit demo bench fmt lint clean check-fresh

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --bins

release: deps
	$(CARGO) build --workspace --bins --release

# Every test, including those that need root and a real etcd (which fail instead of
# skipping here, so a green run means they all ran).
test: build
	OVERLAY_TEST_STRICT=1 $(CARGO) test --workspace -- --test-threads=4

# The clean-room check: install-deps, a build and the deploy tests inside a minimal Debian
# 12 root (mmdebstrap), with this machine's Rust toolchain; proves the install path on a
# machine that has nothing else (scripts/check-fresh.sh). Root; CI runs it after `test`.
check-fresh: deps
	scripts/check-fresh.sh

# Fast tests only: pure logic, no etcd, no root.
unit:
	$(CARGO) test --workspace --lib

demo: build
	scripts/demo.sh

bench: release
	$(CARGO) bench -p overlay-tests --bench control_plane

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean

# overlayctl's manual pages, generated from its command-line definition: overlayctl.1 and
# one page per subcommand, in target/man (install: cp target/man/*.1 /usr/local/share/man/man1/).
.PHONY: man
man:
	$(CARGO) run -q -p overlayctl -- man --out target/man

# CNI ADD+DEL latency: overlay-cni against Debian's bridge + host-local plugins, side by
# side in one run (root; results in docs/benchmarks.md, "CNI").
.PHONY: bench-cni
bench-cni: release
	bench/cni.sh

# Datapath: programming 1000 peers (netlink module vs ip -batch), agent restart with 1000
# peers, iperf3 over vxlan/host-gw vs hand-built entries vs the underlay; one run, root,
# namespaces only (results in docs/benchmarks.md, "Datapath").
.PHONY: bench-datapath
bench-datapath: release
	$(CARGO) bench -p overlay-tests --bench datapath

# The fault-injection suite alone (root and etcd): etcd down for 30 s, controllers killed
# during join bursts, agents killed, a host cut off the underlay, slow and resuming watch
# clients, bad input. `make test` runs it too; here the scenarios run one at a time and
# their counts are also written to target/faults.md (docs/reliability.md holds a real run).
.PHONY: faults
faults: build
	rm -f target/faults.md
	OVERLAY_TEST_STRICT=1 OVERLAY_FAULTS_REPORT=$(CURDIR)/target/faults.md \
		$(CARGO) test -p overlay-tests --test faults -- --test-threads=1 --nocapture

# Every fuzz target for FUZZ_SECONDS each (default 20); fails on a crash. Needs no nightly
# toolchain (scripts/fuzz.sh sets RUSTC_BOOTSTRAP) and installs cargo-fuzz when missing.
# Not part of `test`: see docs/fuzzing.md.
.PHONY: fuzz
fuzz:
	scripts/fuzz.sh
