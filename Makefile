# Overlay: the two commands that matter are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: all deps build release test unit demo bench fmt lint clean

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
