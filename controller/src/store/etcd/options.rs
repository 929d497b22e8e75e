//! How to reach a secured etcd: TLS files and a user, checked before any request, each
//! error naming the controller flag that sets the value.

use super::*;

/// How to secure the connection to etcd, beyond the endpoints. Each field is named after
/// the controller flag that sets it, and errors name that flag.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// The CA etcd's server certificate must chain to (`--etcd-cacert`); required for
    /// `https://` endpoints.
    pub ca_cert: Option<PathBuf>,
    /// A client certificate to present, for etcd's `--client-cert-auth` (`--etcd-cert`).
    pub client_cert: Option<PathBuf>,
    /// The key of `client_cert` (`--etcd-key`).
    pub client_key: Option<PathBuf>,
    /// etcd user (`--etcd-user`), for etcd's own authentication.
    pub user: Option<String>,
    /// The user's password (`--etcd-password` or `--etcd-password-file`).
    pub password: Option<String>,
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

pub(super) fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::InvalidOptions(message.into())
}

/// Reads a PEM file given by `flag`.
pub(super) fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    let bytes =
        std::fs::read(path).map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(invalid(format!(
            "{flag} {}: not a PEM file",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Parses the certificates of a PEM file given by `flag`; at least one.
pub(super) fn pem_certs(
    flag: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let bytes = read_pem(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{flag} {}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

impl EtcdOptions {
    /// A rustls client config with the same trust and identity as the gRPC channel's; it
    /// checks the files in detail and drives [`EtcdStore::check_tls`].
    pub(super) fn rustls_config(&self) -> Result<Option<Arc<ClientConfig>>, StoreError> {
        let Some(ca) = &self.ca_cert else {
            return Ok(None);
        };
        let mut roots = RootCertStore::empty();
        for cert in pem_certs("--etcd-cacert", ca)? {
            roots
                .add(cert)
                .map_err(|e| invalid(format!("--etcd-cacert {}: {e}", ca.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
        let mut config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = pem_certs("--etcd-cert", cert)?;
                let key_der = PrivateKeyDer::from_pem_slice(&read_pem("--etcd-key", key)?)
                    .map_err(|e| {
                        invalid(format!(
                            "--etcd-key {}: no usable private key in the file ({e})",
                            key.display()
                        ))
                    })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    invalid(format!(
                        "--etcd-cert {} with --etcd-key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    fn uses_tls(&self) -> bool {
        self.ca_cert.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }

    /// Checks the options against `endpoints` and loads the TLS files; `None` for plaintext.
    pub(super) fn tls(&self, endpoints: &[String]) -> Result<Option<TlsOptions>, StoreError> {
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid(
                "--etcd-user and --etcd-password (or --etcd-password-file) go together: pass both",
            ));
        }
        if self.user.as_deref() == Some("") {
            return Err(invalid("--etcd-user is empty"));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(invalid("--etcd-cert and --etcd-key go together: pass both"));
        }
        let https = endpoints.iter().filter(|e| e.starts_with("https://"));
        let http = endpoints.iter().filter(|e| e.starts_with("http://"));
        if !self.uses_tls() {
            if let Some(e) = https.clone().next() {
                return Err(invalid(format!(
                    "etcd endpoint {e} is https: pass --etcd-cacert (the CA of etcd's server certificate)"
                )));
            }
            return Ok(None);
        }
        if let Some(e) = http.clone().next() {
            return Err(invalid(format!(
                "--etcd-cacert/--etcd-cert/--etcd-key need https:// endpoints, got {e}"
            )));
        }
        let Some(ca) = &self.ca_cert else {
            return Err(invalid(
                "--etcd-cert/--etcd-key need --etcd-cacert (the CA of etcd's server certificate)",
            ));
        };
        self.rustls_config()?;
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem("--etcd-cacert", ca)?));
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            let identity =
                Identity::from_pem(read_pem("--etcd-cert", cert)?, read_pem("--etcd-key", key)?);
            tls = tls.identity(identity);
        }
        // Building an endpoint parses the certificates and the key (nothing is sent), so a
        // file that is PEM but not a usable certificate or key fails here, by name.
        for e in endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("https://{e}")
            };
            tonic::transport::Endpoint::from_shared(url)
                .map_err(|err| invalid(format!("etcd endpoint {e}: {err}")))?
                .tls_config(tls.clone())
                .map_err(|err| {
                    invalid(format!(
                        "TLS setup from --etcd-cacert {}, --etcd-cert {}, --etcd-key {}: {}",
                        ca.display(),
                        display_opt(&self.client_cert),
                        display_opt(&self.client_key),
                        error_chain(&err),
                    ))
                })?;
        }
        Ok(Some(tls))
    }
}

pub(super) fn display_opt(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "(none)".to_string(), |p| p.display().to_string())
}
