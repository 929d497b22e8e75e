//! Child processes that die with the test, loopback addresses and ports, binaries and
//! polling.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Child {
    pub name: String,
    pub inner: std::process::Child,
}

impl Child {
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> std::io::Result<Child> {
        let name = name.into();
        let inner = cmd
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        Ok(Child { name, inner })
    }

    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(self.inner.id() as i32, sig);
        }
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.inner.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.inner.kill();
        let _ = self.inner.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// This test process's own loopback address, `127.A.B.C` with `A.B.C` made from the pid
/// (`A` = 64 + pid / 65536), so no two live test processes share one.
///
/// Fixtures listen here on ports from [`next_port`], never on ports found free by probing:
/// a probed port can be taken before its user binds it, and a port in the kernel's
/// ephemeral range can be taken while a fixture is down (a restart) by any outgoing
/// connection, even one to itself. Outgoing connections on this machine take
/// 127.0.0.1 as their source, and `next_port` stays below the ephemeral range, so nothing
/// but this process's fixtures ever binds `loopback():port`.
pub fn loopback() -> Ipv4Addr {
    let pid = std::process::id();
    assert!(pid < 1 << 22, "pid {pid} does not fit 22 bits");
    Ipv4Addr::new(127, 64 + (pid >> 16) as u8, (pid >> 8) as u8, pid as u8)
}

/// The first port [`next_port`] hands out, and the end of its range (below Linux's default
/// ephemeral range, 32768-60999; checked against the running kernel).
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port on [`loopback`] that no other fixture of this process has: a counter, not a probe.
pub fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(PORTS.start);
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let range =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let low: u16 = range
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(u16::MAX);
        assert!(
            low >= PORTS.end,
            "the kernel's ephemeral ports start at {low}, inside the fixtures' range {PORTS:?}"
        );
    });
    let port = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(PORTS.contains(&port), "fixture ports used up");
    port
}

/// `loopback():port` as a string, for flags.
pub fn loopback_addr(port: u16) -> String {
    format!("{}:{port}", loopback())
}

/// Reads what a daemon wrote to its `--addr-file` (`grpc=ADDR`, `health=ADDR` lines): the
/// address it bound for `what`, once the file exists.
pub fn read_addr_file(path: &Path, what: &str) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(what)?.strip_prefix('='))
        .and_then(|a| a.parse().ok())
}

/// The path of one of the workspace's binaries, built next to the running test.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        p.display()
    );
    p
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
