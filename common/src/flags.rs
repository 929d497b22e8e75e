//! The TLS flags of every binary, declared once: `#[command(flatten)] tls: TlsArgs`.

use std::path::PathBuf;

use crate::tls::{TlsError, Transport};

/// Mutual TLS with three files, or plaintext with `--insecure` (labs and tests only).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This component's certificate (PEM); with --tls-key and --tls-ca enables mutual TLS.
    #[arg(long, env = "OVERLAY_TLS_CERT", global = true, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "OVERLAY_TLS_KEY", global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA the other side's certificate must chain to (PEM).
    #[arg(long, env = "OVERLAY_TLS_CA", global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Plaintext gRPC without certificates (labs and tests only).
    #[arg(long, env = "OVERLAY_INSECURE", global = true)]
    pub insecure: bool,
}

impl TlsArgs {
    /// The transport these flags ask for, or what is missing.
    pub fn transport(&self) -> Result<Transport, TlsError> {
        Transport::from_flags(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
            self.insecure,
        )
    }
}
