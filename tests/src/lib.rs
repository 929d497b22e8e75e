//! Test fixtures shared by the end-to-end tests and by other crates' integration tests.
//!
//! Fixtures start real processes (etcd, the project's binaries) on this process's own loopback
//! address ([`proc::loopback`]),
//! with temp dirs, and kill them on drop. Tests that need something missing (etcd, root)
//! print why they are skipped; with `OVERLAY_TEST_STRICT=1` (set by `make test`) a missing
//! prerequisite fails the test instead, so CI can never pass by skipping.

pub mod cluster;
pub mod etcd;
pub mod labs;
pub mod proc;

pub use etcd::{Etcd, EtcdCluster};
pub use proc::{bin_path, loopback, loopback_addr, next_port, read_addr_file, wait_until, Child};

/// Whether missing prerequisites must fail tests instead of skipping them.
pub fn strict() -> bool {
    std::env::var_os("OVERLAY_TEST_STRICT").is_some_and(|v| v != "0" && !v.is_empty())
}

/// Reports a skipped test, or panics in strict mode.
pub fn skip(test: &str, why: &str) {
    if strict() {
        panic!("{test}: cannot run: {why} (OVERLAY_TEST_STRICT is set)");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Whether this process runs as root (needed for network namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
