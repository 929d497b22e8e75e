//! CNI errors as the spec shapes them: `{"cniVersion","code","msg","details"}` on stdout
//! and a non-zero exit.
//!
//! Codes below 100 are the spec's, and runtimes act on some of them (11 means "retry",
//! 3 means "no DEL needed", 50 is STATUS's "not ready"), so each failure is mapped to the
//! code whose meaning matches what a runtime should do next, not to the nearest message.
//! Codes 100 and up are this plugin's own and only tell a human where to look.

use serde::Serialize;

/// The error codes this plugin returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The config's `cniVersion` is not one this plugin speaks (or the command needs a
    /// newer one: GC and STATUS need 1.1.0).
    IncompatibleVersion,
    /// A config field this plugin deliberately does not support (e.g. `ipam`).
    UnsupportedField,
    /// The container (its network namespace) does not exist.
    UnknownContainer,
    /// A required CNI_* variable is missing or malformed.
    InvalidEnvironment,
    /// Reading or writing the plugin's own files failed.
    Io,
    /// stdin (or `prevResult`) is not valid JSON of the expected shape.
    Decoding,
    /// The config is JSON but its values are not acceptable.
    InvalidConfig,
    /// The agent is not ready yet (no `subnet.env`, no bridge): retrying later can work.
    TryAgainLater,
    /// STATUS: the plugin cannot serve ADDs now.
    PluginNotAvailable,
    /// A kernel operation (netlink) failed.
    Kernel,
    /// Every address of the host's subnet is taken.
    AddressesExhausted,
    /// CHECK: the container's networking differs from `prevResult`.
    CheckFailed,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decoding => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::PluginNotAvailable => 50,
            ErrorCode::Kernel => 100,
            ErrorCode::AddressesExhausted => 101,
            ErrorCode::CheckFailed => 102,
        }
    }
}

/// A failed CNI command: what the runtime gets on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {}: {msg}{}", code.code(), if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: ErrorCode,
    /// One line saying what failed.
    pub msg: String,
    /// The underlying cause, when there is one.
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl std::fmt::Display) -> CniError {
        self.details = details.to_string();
        self
    }

    /// The spec's error JSON, labelled with `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code.code(),
            msg: &self.msg,
            details: &self.details,
        })
        .expect("error serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_as_the_spec_json() {
        let e = CniError::new(ErrorCode::InvalidConfig, "mtu must be a number")
            .with_details("invalid type: string \"big\"");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "mtu must be a number");
        assert_eq!(v["details"], "invalid type: string \"big\"");
        let plain = CniError::new(ErrorCode::TryAgainLater, "no bridge");
        let v: serde_json::Value = serde_json::from_str(&plain.to_json("1.1.0")).unwrap();
        assert_eq!(v["code"], 11);
        assert!(v.get("details").is_none());
        assert_eq!(plain.to_string(), "CNI error 11: no bridge");
    }
}
