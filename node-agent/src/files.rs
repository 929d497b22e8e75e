//! Files the agent owns: `subnet.env` in the run dir, and its state in the state dir.
//!
//! Every write goes through [`overlay_common::durable::write`]: a new temp file in the same
//! directory, synced, renamed over the target, and the directory synced, so a reader
//! (dockerd's wrapper, the CNI plugin, a crash, a power loss) never sees half a file and
//! a failed write leaves nothing behind.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::{IpNet, Ipv6Net};
pub use overlay_common::durable::FileError;
use overlay_common::durable::WriteOptions;
pub use overlay_core::subnet_env::{SubnetEnv, MAX_SUBNET_ENV_BYTES};
use overlay_core::MacAddr;
use serde::{Deserialize, Serialize};

pub use overlay_core::host_files::SUBNET_ENV;
pub const STATE_FILE: &str = "state.json";
/// Largest `subnet.env` read or parsed. The agent writes about 100 bytes; the bound only
/// keeps a wrong path (a log, a device) from being read whole by every CNI call.
/// Largest state file loaded; the agent writes a few hundred bytes.
pub const MAX_STATE_BYTES: usize = 64 * 1024;

/// Writes `contents` to `path` durably (mode 0644), creating its directory if needed.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| FileError {
        action: "creating the directory of",
        path: path.to_path_buf(),
        source,
    })?;
    overlay_common::durable::write(path, contents, WriteOptions::replace(0o644))
}

/// Reads at most `limit` bytes of `path`; a longer file is an `InvalidData` error that
/// names the limit (never a silently truncated read).
pub fn read_bounded(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file is larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// [`read_bounded`], as UTF-8 text.
pub fn read_to_string_bounded(path: &Path, limit: usize) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, limit)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Reads and parses a `subnet.env` (bounded); `None` when missing or unusable.
pub fn read_subnet_env(path: &Path) -> Option<SubnetEnv> {
    read_to_string_bounded(path, MAX_SUBNET_ENV_BYTES)
        .ok()
        .and_then(|t| SubnetEnv::parse(&t).ok())
}

/// What the agent remembers across restarts and reboots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The node name the subnet was leased for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The key subnet (IPv4, or IPv6 in an IPv6-only cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<IpNet>,
    /// Dual stack: the IPv6 subnet beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet: Option<Ipv6Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<Ipv4Addr>,
    /// The VTEP MAC, kept stable across restarts (Flannel's issues #1795/#1828).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<MacAddr>,
}

impl AgentState {
    pub fn load(dir: &Path) -> AgentState {
        let path = dir.join(STATE_FILE);
        match read_bounded(&path, MAX_STATE_BYTES) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable state file");
                AgentState::default()
            }),
            Err(_) => AgentState::default(),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), FileError> {
        write_atomic(
            &dir.join(STATE_FILE),
            &serde_json::to_vec_pretty(self).expect("state serializes"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_env_renders_the_gateway_and_parses_back() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().ok(),
            subnet: "10.244.7.0/24".parse().ok(),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ip_masq: false,
        };
        let text = env.render();
        assert_eq!(
            text,
            "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=false\n"
        );
        assert_eq!(SubnetEnv::parse(&text).unwrap(), env);
        assert!(SubnetEnv::parse("OVERLAY_NETWORK=10.244.0.0/16\n").is_err());
        assert!(SubnetEnv::parse("OVERLAY_MTU=big\n")
            .unwrap_err()
            .contains("OVERLAY_MTU"));
    }

    /// Found by the subnet_env fuzz target: a /32 subnet parsed, rendered its "gateway"
    /// (the next address) and parsed back as another subnet; at 255.255.255.255/32 the
    /// gateway computation overflowed.
    #[test]
    fn subnet_env_values_must_be_usable() {
        let env = |subnet: &str, mtu: &str| {
            SubnetEnv::parse(&format!(
                "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET={subnet}\nOVERLAY_MTU={mtu}\n"
            ))
        };
        let e = env("10.244.42.1/32", "1450").unwrap_err();
        assert!(e.contains("at most a /30"), "{e}");
        assert!(env("10.244.42.1/31", "1450").is_err());
        let e = env("10.47.42.1/24", "1450").unwrap_err();
        assert!(e.contains("outside OVERLAY_NETWORK=10.244.0.0/16"), "{e}");
        assert!(SubnetEnv::parse(
            "OVERLAY_NETWORK=0.0.0.0/0\nOVERLAY_SUBNET=255.255.255.255/32\nOVERLAY_MTU=1450\n"
        )
        .is_err());
        let e = env("10.244.42.1/24", "67").unwrap_err();
        assert!(e.contains("outside 68..=65535"), "{e}");
        assert!(env("10.244.42.1/24", "65536").is_err());
        let ok = env("10.244.42.1/30", "68").unwrap();
        assert_eq!(SubnetEnv::parse(&ok.render()).unwrap(), ok);
    }

    #[test]
    fn subnet_env_size_is_bounded() {
        let text =
            "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=1450\n";
        let padded = format!("{text}{}", "#".repeat(MAX_SUBNET_ENV_BYTES - text.len()));
        assert!(SubnetEnv::parse(&padded).is_ok());
        let e = SubnetEnv::parse(&format!("{padded}#")).unwrap_err();
        assert!(e.contains("over the limit of 65536"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SUBNET_ENV);
        std::fs::write(&path, &padded).unwrap();
        assert!(read_subnet_env(&path).is_some());
        assert_eq!(
            read_to_string_bounded(&path, 4).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        std::fs::write(&path, format!("{padded}#")).unwrap();
        assert!(read_subnet_env(&path).is_none());
        let e = read_bounded(&path, MAX_SUBNET_ENV_BYTES).unwrap_err();
        assert!(e.to_string().contains("larger than 65536 bytes"), "{e}");
        std::fs::write(&path, b"\xff").unwrap();
        assert_eq!(
            read_to_string_bounded(&path, 4).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/subnet.env");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["subnet.env"]);
    }

    /// A write that failed half way (here: the filesystem is full) left its temp file
    /// behind, and no write synced the directory it renamed in.
    #[test]
    fn a_failed_write_leaves_no_temp_file_and_the_old_contents() {
        if !overlay_tests::is_root() {
            overlay_tests::skip(
                "a_failed_write_leaves_no_temp_file_and_the_old_contents",
                "needs root to mount a small tmpfs in a mount namespace of its own",
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mount_point = dir.path().to_path_buf();
        // Only this thread enters the new mount namespace, so the full filesystem is seen
        // by nothing else, and it goes away with the thread.
        std::thread::spawn(move || {
            use std::ffi::CString;
            let c = |s: &str| CString::new(s).unwrap();
            let (root, tmpfs) = (c("/"), c("tmpfs"));
            let (target, opts) = (c(mount_point.to_str().unwrap()), c("size=16k,mode=0700"));
            // SAFETY: plain syscalls on NUL-terminated strings that outlive the calls.
            unsafe {
                assert_eq!(
                    libc::unshare(libc::CLONE_NEWNS),
                    0,
                    "unshare: {}",
                    std::io::Error::last_os_error()
                );
                let private = libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                );
                assert_eq!(private, 0, "{}", std::io::Error::last_os_error());
                let mounted = libc::mount(
                    tmpfs.as_ptr(),
                    target.as_ptr(),
                    tmpfs.as_ptr(),
                    0,
                    opts.as_ptr().cast(),
                );
                assert_eq!(mounted, 0, "{}", std::io::Error::last_os_error());
            }
            let path = mount_point.join(STATE_FILE);
            write_atomic(&path, b"old").unwrap();
            let e = write_atomic(&path, &vec![b'x'; 1 << 20]).unwrap_err();
            assert_eq!(e.source.raw_os_error(), Some(libc::ENOSPC), "{e}");
            let names: Vec<_> = std::fs::read_dir(&mount_point)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![STATE_FILE], "a temp file is left behind");
            assert_eq!(std::fs::read(&path).unwrap(), b"old");
        })
        .join()
        .expect("the write in a full filesystem");
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AgentState::load(dir.path()), AgentState::default());
        let s = AgentState {
            node: Some("n1".into()),
            subnet: Some("10.244.3.0/24".parse().unwrap()),
            ipv6_subnet: None,
            public_ip: Some("192.0.2.1".parse().unwrap()),
            vtep_mac: Some("0a:00:00:00:00:01".parse().unwrap()),
        };
        s.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()), s);
        std::fs::write(dir.path().join(STATE_FILE), "garbage").unwrap();
        assert_eq!(AgentState::load(dir.path()), AgentState::default());
    }
}
