//! The smallest HTTP client that serves the lab: one GET over HTTP/1.0, read to the end,
//! from this namespace or (on a thread that entered it) another one. Readiness checks and
//! `/status` are all the lab asks of HTTP, so a client library with a runtime would be
//! more than the job; the tests and `overlayctl agent` use it for the same reason.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::netns;

/// GET `http://addr:port/path` (HTTP/1.0, 5 s timeout): status code and body.
pub fn http_get(addr: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect((addr, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

/// [`http_get`] from inside namespace `ns`.
pub fn http_get_in(ns: &str, addr: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let (addr, path) = (addr.to_string(), path.to_string());
    netns::run_in(ns, move || http_get(&addr, port, &path))
        .ok()
        .flatten()
}
