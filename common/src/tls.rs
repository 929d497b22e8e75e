//! Mutual TLS for the gRPC API: loading PEM files into tonic's configs, and the identity a
//! client certificate proves.
//!
//! Identity is the certificate's subject common name, or its first DNS name when it has no
//! CN. The controller checks it against the node name of every lease request, so a node
//! can only acquire, renew and release its own lease (as Kubernetes' node authorizer and
//! Calico Typha's CN check do), and only identities listed as admins may change config,
//! reserve or revoke. Plaintext exists only behind an explicit `--insecure`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {message}")]
    File {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{0}")]
    Incomplete(String),
}

/// The three PEM files of a TLS setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// How a binary talks to the network: TLS with these files, or plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tls(TlsFiles),
    Insecure,
}

impl Transport {
    /// From the `--tls-cert/--tls-key/--tls-ca/--insecure` flags: all three files, or
    /// `--insecure`; anything else is an error that says what is missing.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
        insecure: bool,
    ) -> Result<Transport, TlsError> {
        match (cert, key, ca, insecure) {
            (Some(cert), Some(key), Some(ca), false) => {
                Ok(Transport::Tls(TlsFiles { cert: cert.into(), key: key.into(), ca: ca.into() }))
            }
            (None, None, None, true) => Ok(Transport::Insecure),
            (_, _, _, true) => Err(TlsError::Incomplete("--insecure cannot be combined with --tls-* flags".into())),
            (None, None, None, false) => Err(TlsError::Incomplete(
                "no TLS credentials: pass --tls-cert, --tls-key and --tls-ca (see `overlayctl certs`), or --insecure for plaintext"
                    .into(),
            )),
            _ => Err(TlsError::Incomplete("--tls-cert, --tls-key and --tls-ca go together: pass all three".into())),
        }
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Tls(_) => "https",
            Transport::Insecure => "http",
        }
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::File {
        flag,
        path: path.into(),
        message: e.to_string(),
    })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(TlsError::File {
            flag,
            path: path.into(),
            message: "not a PEM file".into(),
        });
    }
    Ok(bytes)
}

impl TlsFiles {
    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(
            read("--tls-cert", &self.cert)?,
            read("--tls-key", &self.key)?,
        ))
    }

    fn ca(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(read("--tls-ca", &self.ca)?))
    }

    /// Server side: our certificate, and client certificates required, chained to the CA;
    /// HTTP/2 by ALPN. A rustls config rather than tonic's, so the server can run the
    /// handshakes in its own accept loop, with a timeout and a connection cap.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let bad = |flag: &'static str, path: &Path, message: String| TlsError::File {
            flag,
            path: path.into(),
            message,
        };
        let certs = CertificateDer::pem_slice_iter(&read("--tls-cert", &self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("--tls-cert", &self.cert, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&read("--tls-key", &self.key)?)
            .map_err(|e| bad("--tls-key", &self.key, format!("no private key ({e})")))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&read("--tls-ca", &self.ca)?) {
            let ca = ca.map_err(|e| bad("--tls-ca", &self.ca, e.to_string()))?;
            roots
                .add(ca)
                .map_err(|e| bad("--tls-ca", &self.ca, e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .map_err(|e| bad("--tls-ca", &self.ca, e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Incomplete(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| bad("--tls-cert", &self.cert, e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Client side: trust only the CA, present our certificate.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(self.ca()?)
            .identity(self.identity()?))
    }

    /// The identity our own certificate carries.
    pub fn own_identity(&self) -> Result<String, TlsError> {
        let pem = read("--tls-cert", &self.cert)?;
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| TlsError::File {
            flag: "--tls-cert",
            path: self.cert.clone(),
            message: format!("no certificate in the file ({e})"),
        })?;
        cert_identity(&block.contents).ok_or_else(|| TlsError::File {
            flag: "--tls-cert",
            path: self.cert.clone(),
            message: "the certificate has neither a common name nor a DNS name".into(),
        })
    }
}

/// The identity a DER certificate proves: subject CN, else the first DNS SAN.
pub fn cert_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    })
}

/// The identity of the client of a request, when it connected with a certificate.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    certs.first().and_then(|c| cert_identity(c.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_need_all_three_files_or_insecure() {
        let p = Some(Path::new("/x"));
        assert!(matches!(
            Transport::from_flags(p, p, p, false),
            Ok(Transport::Tls(_))
        ));
        assert_eq!(
            Transport::from_flags(None, None, None, true).unwrap(),
            Transport::Insecure
        );
        let e = Transport::from_flags(None, None, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--insecure") && e.contains("--tls-cert"), "{e}");
        assert!(Transport::from_flags(p, None, p, false)
            .unwrap_err()
            .to_string()
            .contains("all three"));
        assert!(Transport::from_flags(p, p, p, true).is_err());
    }
}
