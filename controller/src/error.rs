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
            ControlError::Exhausted { .. } | ControlError::RateLimited { .. } => {
                Code::ResourceExhausted
            }
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

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
