//! Kernel settings under `/proc/sys` (IP forwarding): a host effect behind a trait, so the
//! backends ask for a setting and tests record what was asked instead of writing it.
//!
//! Sysctls under `net/` belong to the network namespace of the writing thread; no thread of
//! the agent ever leaves the host's namespace (only overlay-cni enters containers), so
//! whichever runtime thread writes, it writes the host's.

#[cfg(any(test, feature = "testing"))]
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
#[error("sysctl {path}: {source}")]
pub struct SysctlError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

pub trait Sysctl: Send + Sync {
    /// Sets `key` (e.g. `net/ipv4/ip_forward`) to `value` unless it already holds it;
    /// whether it wrote.
    fn set(&self, key: &str, value: &str) -> Result<bool, SysctlError>;
}

/// The kernel's `/proc/sys`.
pub struct ProcSysctl;

impl Sysctl for ProcSysctl {
    fn set(&self, key: &str, value: &str) -> Result<bool, SysctlError> {
        set_sysctl(key, value)
    }
}

/// Writes `value` to `/proc/sys/<key>` unless it already holds it; whether it wrote.
pub fn set_sysctl(key: &str, value: &str) -> Result<bool, SysctlError> {
    let path = format!("/proc/sys/{}", key.trim_start_matches('/'));
    let err = |source: std::io::Error| SysctlError {
        path: path.clone(),
        source,
    };
    let current = std::fs::read_to_string(&path).map_err(err)?;
    if current.trim() == value.trim() {
        return Ok(false);
    }
    std::fs::write(&path, value).map_err(err)?;
    Ok(true)
}

/// Records settings instead of writing them.
#[cfg(any(test, feature = "testing"))]
#[derive(Default)]
pub struct FakeSysctl {
    pub values: Mutex<std::collections::BTreeMap<String, String>>,
}

#[cfg(any(test, feature = "testing"))]
impl Sysctl for FakeSysctl {
    fn set(&self, key: &str, value: &str) -> Result<bool, SysctlError> {
        let mut values = self.values.lock().expect("sysctls");
        Ok(values.insert(key.to_string(), value.to_string()).as_deref() != Some(value))
    }
}
