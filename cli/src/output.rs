//! Rendering: aligned tables for people, JSON for programs.
//!
//! Rendering is separate from printing so that every shape (column alignment, the exact
//! JSON keys and their nulls) is unit-tested without a controller. The JSON of a lease is
//! defined once, in [`LeaseJson`], and shared by `leases` and `watch`, so a script that
//! reads one can read the other. Keys are fixed by a struct rather than a `json!` map so
//! they come out in a stable, readable order.

use std::io::Write;
use std::time::{Duration, SystemTime};

use overlay_core::lease::format_rfc3339;
use overlay_core::watch::ChangeKind;
use overlay_core::Lease;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Whether `c` could change what a terminal shows beyond itself: C0 and C1 control
/// characters (escape sequences, carriage return, newline) and the bidirectional-text
/// controls that reorder what follows them.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every control character written as an escape (`\x1b`, `\u{9b}`), for
/// anything that came from a server, an agent or a file and is printed for a person: a
/// hostile value can neither rewrite the terminal nor forge a line or a column.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !is_unsafe(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// JSON text with the characters of [`is_unsafe`] that serde_json leaves raw (C1 and
/// bidirectional controls; it escapes C0 itself) written as `\uXXXX`: the same JSON value,
/// safe on a terminal. They can only occur inside strings, where the escape is valid.
pub fn json_safe(text: String) -> String {
    if !text.chars().any(is_unsafe) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        // A raw newline of pretty-printing is layout, not data.
        if is_unsafe(c) && c != '\n' {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// A table whose columns are separated by two spaces, with no trailing spaces. Every cell
/// is [escaped](escape).
#[derive(Debug, Clone, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table whose first row is `header`, in capitals.
    pub fn with_header(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|h| h.to_uppercase()).collect()],
        }
    }

    /// A table without a header (e.g. key/value listings).
    pub fn plain() -> Self {
        Table::default()
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| {
                    let c: String = c.into();
                    escape(&c).into_owned()
                })
                .collect(),
        );
    }

    /// The rendered table, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A lease as `overlayctl` shows it in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseJson {
    /// The key subnet (IPv4; IPv6 in an IPv6-only cluster).
    pub subnet: String,
    /// Dual stack: the IPv6 subnet.
    pub ipv6_subnet: Option<String>,
    pub node: String,
    pub public_ip: Option<String>,
    pub public_ipv6: Option<String>,
    pub backend: &'static str,
    pub vtep_mac: Option<String>,
    pub reserved: bool,
    /// Null for reservations (they never expire), and in `watch`, whose events do not
    /// carry the expiry (it lives in the etcd lease, not in the value).
    pub expires_at: Option<String>,
    pub created_at: String,
    pub renewed_at: String,
}

/// The one lease -> JSON conversion, used by `leases`, `lease reserve` and `watch`.
pub fn lease_json(lease: &Lease, expires_at: Option<SystemTime>) -> LeaseJson {
    let r = &lease.record;
    LeaseJson {
        subnet: lease.subnet.to_string(),
        ipv6_subnet: r.ipv6_subnet.map(|s| s.to_string()),
        node: r.node.clone(),
        public_ip: r.public_ip.map(|ip| ip.to_string()),
        public_ipv6: r.public_ipv6.map(|ip| ip.to_string()),
        backend: r.backend.as_str(),
        vtep_mac: r.backend_data.vtep_mac.map(|m| m.to_string()),
        reserved: r.reserved,
        expires_at: if r.reserved {
            None
        } else {
            expires_at.map(format_rfc3339)
        },
        created_at: format_rfc3339(r.created_at),
        renewed_at: format_rfc3339(r.renewed_at),
    }
}

/// One line of `watch -o json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WatchEventJson {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub revision: i64,
    pub lease: LeaseJson,
}

pub fn change_name(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Added => "added",
        ChangeKind::Removed => "removed",
    }
}

/// "in 23h59m", "expired 5s ago", or "-" when there is no expiry (reservations).
pub fn relative_expiry(expires_at: Option<SystemTime>, now: SystemTime) -> String {
    match expires_at {
        None => "-".to_string(),
        Some(t) => match t.duration_since(now) {
            Ok(left) => format!("in {}", short_duration(left)),
            Err(e) => format!("expired {} ago", short_duration(e.duration())),
        },
    }
}

/// The two largest units, rounded down: "1d2h", "23h59m", "5m30s", "42s".
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{mins}m")
    } else if mins > 0 {
        format!("{mins}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// Pretty JSON of any value, with a final newline, [safe on a terminal](json_safe).
pub fn json_pretty<T: Serialize + ?Sized>(value: &T) -> String {
    let mut text = json_safe(serde_json::to_string_pretty(value).expect("output types serialize"));
    text.push('\n');
    text
}

/// Compact JSON of any value on one line, [safe on a terminal](json_safe).
pub fn json_line<T: Serialize + ?Sized>(value: &T) -> String {
    json_safe(serde_json::to_string(value).expect("output types serialize"))
}

/// Writes to stdout and flushes (watch output must not sit in a buffer).
pub fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use overlay_core::lease::{from_unix_millis, BackendData, LeaseRecord};
    use overlay_core::BackendType;

    pub(crate) fn lease(subnet: &str, node: &str, reserved: bool) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            record: LeaseRecord {
                node: node.into(),
                public_ip: Some("192.0.2.11".parse().unwrap()),
                public_ipv6: None,
                ipv6_subnet: None,
                backend: BackendType::Vxlan,
                backend_data: BackendData {
                    vtep_mac: (!reserved).then(|| "0a:58:0a:f4:07:00".parse().unwrap()),
                    ..Default::default()
                },
                reserved,
                created_at: from_unix_millis(1_700_000_000_123),
                renewed_at: from_unix_millis(1_700_000_060_000),
            },
        }
    }

    #[test]
    fn tables_align_with_two_spaces_and_no_trailing_spaces() {
        let mut t = Table::with_header(&["subnet", "node", "vtep mac"]);
        t.row(["10.244.10.0/24", "n1", "-"]);
        t.row(["10.244.7.0/24", "a-longer-node", ""]);
        assert_eq!(
            t.render(),
            "SUBNET          NODE           VTEP MAC\n\
             10.244.10.0/24  n1             -\n\
             10.244.7.0/24   a-longer-node\n"
        );
        let mut kv = Table::plain();
        kv.row(["network", "10.244.0.0/16"]);
        kv.row(["direct_routing", "false"]);
        assert_eq!(
            kv.render(),
            "network         10.244.0.0/16\ndirect_routing  false\n"
        );
        assert_eq!(Table::plain().render(), "");
    }

    #[test]
    fn lease_json_has_exact_keys_and_nulls() {
        let expires = from_unix_millis(1_700_086_400_000);
        let v = serde_json::to_value(lease_json(
            &lease("10.244.7.0/24", "n1", false),
            Some(expires),
        ))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "subnet": "10.244.7.0/24",
                "ipv6_subnet": null,
                "node": "n1",
                "public_ip": "192.0.2.11",
                "public_ipv6": null,
                "backend": "vxlan",
                "vtep_mac": "0a:58:0a:f4:07:00",
                "reserved": false,
                "expires_at": "2023-11-15T22:13:20.000Z",
                "created_at": "2023-11-14T22:13:20.123Z",
                "renewed_at": "2023-11-14T22:14:20.000Z",
            })
        );
        // A reservation: no MAC, no expiry, even if one were passed.
        let v = serde_json::to_value(lease_json(
            &lease("10.244.8.0/24", "n2", true),
            Some(expires),
        ))
        .unwrap();
        assert_eq!(v["vtep_mac"], serde_json::Value::Null);
        assert_eq!(v["expires_at"], serde_json::Value::Null);
        assert_eq!(v["reserved"], serde_json::Value::Bool(true));
        assert_eq!(v.as_object().unwrap().len(), 11);
        // Key order is the struct's, not alphabetical.
        let text =
            serde_json::to_string(&lease_json(&lease("10.244.8.0/24", "n2", true), None)).unwrap();
        assert!(
            text.starts_with(r#"{"subnet":"10.244.8.0/24","ipv6_subnet":null,"node":"n2","#),
            "{text}"
        );
    }

    #[test]
    fn watch_event_json_shape() {
        let e = WatchEventJson {
            kind: change_name(ChangeKind::Removed),
            revision: 42,
            lease: lease_json(&lease("10.244.7.0/24", "n1", false), None),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert!(
            text.starts_with(
                r#"{"type":"removed","revision":42,"lease":{"subnet":"10.244.7.0/24""#
            ),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn relative_expiry_text() {
        let now = from_unix_millis(1_000_000_000);
        let at = |secs: u64| Some(now + Duration::from_secs(secs));
        assert_eq!(relative_expiry(None, now), "-");
        assert_eq!(relative_expiry(at(24 * 3600 - 1), now), "in 23h59m");
        assert_eq!(relative_expiry(at(24 * 3600), now), "in 1d0h");
        assert_eq!(
            relative_expiry(at(3 * 86_400 + 5 * 3600 + 7), now),
            "in 3d5h"
        );
        assert_eq!(relative_expiry(at(330), now), "in 5m30s");
        assert_eq!(relative_expiry(at(42), now), "in 42s");
        assert_eq!(relative_expiry(at(0), now), "in 0s");
        assert_eq!(
            relative_expiry(Some(now - Duration::from_secs(5)), now),
            "expired 5s ago"
        );
        assert_eq!(
            relative_expiry(Some(now + Duration::from_millis(59_999)), now),
            "in 59s",
            "rounded down"
        );
    }

    /// A value from the server (here an interface name an agent published) carried a
    /// terminal escape sequence, and the table printed it raw.
    #[test]
    fn tables_escape_control_characters_from_the_server() {
        let mut t = Table::with_header(&["subnet", "dev", "peer"]);
        t.row(["10.244.7.0/24", "e\x1b]0;owned\x07", "n1\r\nforged  row"]);
        t.row(["10.244.8.0/24", "eth\u{9b}2J", "n\u{202e}2"]);
        let out = t.render();
        assert!(!out.chars().any(is_unsafe_but_newline), "{out:?}");
        assert_eq!(out.lines().count(), 3, "{out}");
        assert!(out.contains("e\\x1b]0;owned\\x07"), "{out}");
        assert!(out.contains("n1\\x0d\\x0aforged  row"), "{out}");
        assert!(
            out.contains("eth\\u{9b}2J") && out.contains("n\\u{202e}2"),
            "{out}"
        );
        assert_eq!(escape("eth0"), "eth0");

        let json = json_pretty(&serde_json::json!({"dev": "a\x1bb\u{9b}c\u{202e}d"}));
        assert!(!json.chars().any(is_unsafe_but_newline), "{json:?}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["dev"], "a\x1bb\u{9b}c\u{202e}d", "the same value");
    }

    fn is_unsafe_but_newline(c: char) -> bool {
        c != '\n' && is_unsafe(c)
    }
}
