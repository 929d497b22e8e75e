//! The controller's errors, and their one mapping to gRPC status codes.

use overlay_core::config::ConfigError;
use overlay_core::lease::LeaseError;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no network config is set: run `overlayctl config set --network CIDR` first")]
    NoConfig,
    #[error("the stored network config is unreadable: {0}")]
    BadStoredConfig(ConfigError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("subnet range exhausted: all {total} subnets of {range} are leased")]
    Exhausted { total: u64, range: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("node {node:?} may not change the lease of {subnet}, held by node {holder:?}")]
    NotHolder {
        node: String,
        subnet: String,
        holder: String,
    },
    #[error("permission denied: {0}")]
    Forbidden(String),
    #[error("gave up after {0} attempts: the store kept changing under us; retry")]
    Contention(u32),
    #[error(
        "too many listing calls from {identity:?}: the controller allows {rate} per second \
         per identity, in bursts of up to {burst} (--list-rate, --list-burst); retry in {} ms",
        retry_after.as_millis()
    )]
    RateLimited {
        identity: String,
        rate: f64,
        burst: u32,
        retry_after: std::time::Duration,
    },
    #[error("the request did not finish within the controller's --request-timeout ({0:?}); retry")]
    Timeout(std::time::Duration),
    /// Too much work of this kind queued: retry after `retry_after` (sent as the
    /// `grpc-retry-pushback-ms` trailer too).
    #[error(
        "the controller is busy with other {what}; retry in {} ms",
        retry_after.as_millis()
    )]
    Busy {
        what: &'static str,
        retry_after: std::time::Duration,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ControlError {
    /// The gRPC status code of this error: the one mapping, used for the reply and for
    /// the metrics' `code` label alike.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ControlError::NoConfig => Code::FailedPrecondition,
            ControlError::BadStoredConfig(_) => Code::Internal,
            ControlError::Config(_) | ControlError::Lease(_) | ControlError::InvalidArgument(_) => {
                Code::InvalidArgument
            }
            ControlError::Exhausted { .. }
            | ControlError::RateLimited { .. }
            | ControlError::Busy { .. } => Code::ResourceExhausted,
            ControlError::Timeout(_) => Code::DeadlineExceeded,
            ControlError::NotFound(_) => Code::NotFound,
            ControlError::FailedPrecondition(_) => Code::FailedPrecondition,
            ControlError::NotHolder { .. } | ControlError::Forbidden(_) => Code::PermissionDenied,
            ControlError::Contention(_) => Code::Aborted,
            ControlError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            ControlError::Store(StoreError::LeaseNotFound(_)) => Code::NotFound,
            ControlError::Store(_) => Code::Internal,
        }
    }
}

/// The metadata key of gRPC's retry pushback (gRFC A6): how long to wait before retrying,
/// in milliseconds. Set on every answer that means "not now, later".
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

impl ControlError {
    /// How long the caller should wait before trying again, when the answer is "later".
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ControlError::Busy { retry_after, .. }
            | ControlError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        let retry_after = e.retry_after();
        let mut status = tonic::Status::new(e.code(), e.to_string());
        if let Some(after) = retry_after {
            let ms = after.as_millis().max(1).to_string();
            if let Ok(v) = ms.parse() {
                status.metadata_mut().insert(RETRY_PUSHBACK, v);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn answers_that_mean_later_carry_a_retry_pushback() {
        let busy: tonic::Status = ControlError::Busy {
            what: "acquires",
            retry_after: Duration::from_millis(1500),
        }
        .into();
        assert_eq!(busy.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            busy.metadata()
                .get(RETRY_PUSHBACK)
                .unwrap()
                .to_str()
                .unwrap(),
            "1500"
        );
        assert!(
            busy.message().contains("retry in 1500 ms"),
            "{}",
            busy.message()
        );
        let full: tonic::Status = ControlError::Exhausted {
            total: 2,
            range: "a-b".into(),
        }
        .into();
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        assert!(
            full.metadata().get(RETRY_PUSHBACK).is_none(),
            "exhausted is no 'later'"
        );
    }
}
