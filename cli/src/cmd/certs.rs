//! `overlayctl certs`: a small CA for a small cluster.
//!
//! `certs init` makes a CA; `certs issue --name NAME` a certificate whose common name is
//! NAME: a node's name (the controller then lets it act only for that node), `admin` (the
//! default admin identity of the controller), or `controller` with the addresses agents
//! dial in `--ip`/`--dns`. Every certificate is good for both server and client auth, so
//! one file serves a controller and its own calls. Keys are written mode 0600. For larger
//! clusters use your PKI: Overlay only needs PEM files and a CN.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA (ca.pem, ca-key.pem) in DIR
    Init(InitArgs),
    /// Issue a certificate (NAME.pem, NAME-key.pem) signed by the CA in DIR
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Validity in days
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
    /// Replace an existing CA (every certificate it issued stops being trusted)
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The identity: a node name, "admin", or "controller"
    #[arg(long)]
    pub name: String,
    /// IP addresses clients use to reach this identity as a server (repeatable)
    #[arg(long = "ip", value_name = "IP")]
    pub ips: Vec<IpAddr>,
    /// DNS names clients use to reach this identity as a server (repeatable)
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<String>,
    /// Validity in days
    #[arg(long, default_value_t = 825)]
    pub days: u32,
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init(a) => init(&a),
        CertsCommand::Issue(a) => issue(&a),
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days.into());
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

pub fn init(a: &InitArgs) -> anyhow::Result<()> {
    if a.days == 0 {
        bail!("--days: must be at least 1");
    }
    let (cert_path, key_path) = (a.dir.join("ca.pem"), a.dir.join("ca-key.pem"));
    if cert_path.exists() && !a.force {
        bail!(
            "{} exists: pass --force to replace the CA",
            cert_path.display()
        );
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("--dir {}", a.dir.display()))?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Overlay CA");
    dn.push(DnType::OrganizationName, "Overlay");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, a.days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&key_path, &key.serialize_pem(), 0o600)?;
    write(&cert_path, &cert.pem(), 0o644)?;
    println!(
        "CA written: {} (key {})",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

pub fn issue(a: &IssueArgs) -> anyhow::Result<()> {
    if a.name.is_empty()
        || a.name.len() > 253
        || !a
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        bail!(
            "--name: {:?} is not a valid identity (letters, digits, '.', '-', '_')",
            a.name
        );
    }
    if a.days == 0 {
        bail!("--days: must be at least 1");
    }
    let ca_pem = std::fs::read_to_string(a.dir.join("ca.pem")).with_context(|| {
        format!(
            "no CA in {} (run `overlayctl certs init --dir {}`)",
            a.dir.display(),
            a.dir.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(a.dir.join("ca-key.pem")).context("reading ca-key.pem")?,
    )
    .map_err(|e| anyhow!("ca-key.pem: {e}"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| anyhow!("ca.pem: {e}"))?;

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, a.name.as_str());
    params.distinguished_name = dn;
    let mut sans = Vec::new();
    if a.name.contains(|c: char| c.is_ascii_alphabetic()) && !a.name.contains('_') {
        sans.push(SanType::DnsName(a.name.clone().try_into()?));
    }
    for d in &a.dns {
        sans.push(SanType::DnsName(
            d.clone()
                .try_into()
                .map_err(|_| anyhow!("--dns: {d:?} is not a DNS name"))?,
        ));
    }
    sans.extend(a.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, a.days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (
        a.dir.join(format!("{}.pem", a.name)),
        a.dir.join(format!("{}-key.pem", a.name)),
    );
    write(&key_path, &key.serialize_pem(), 0o600)?;
    write(&cert_path, &cert.pem(), 0o644)?;
    println!(
        "certificate for {} written: {} (key {})",
        a.name,
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_rpc::tls::TlsFiles;

    #[test]
    fn issued_certificates_carry_the_name_as_identity() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        init(&InitArgs {
            dir: d.clone(),
            days: 10,
            force: false,
        })
        .unwrap();
        assert!(
            init(&InitArgs {
                dir: d.clone(),
                days: 10,
                force: false
            })
            .is_err(),
            "no silent CA replacement"
        );
        issue(&IssueArgs {
            dir: d.clone(),
            name: "node-1".into(),
            ips: vec!["192.0.2.1".parse().unwrap()],
            dns: vec![],
            days: 5,
        })
        .unwrap();
        let files = TlsFiles {
            cert: d.join("node-1.pem"),
            key: d.join("node-1-key.pem"),
            ca: d.join("ca.pem"),
        };
        assert_eq!(files.own_identity().unwrap(), "node-1");
        files.server_config().unwrap();
        files.client_config().unwrap();
        let mode = std::fs::metadata(d.join("node-1-key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(issue(&IssueArgs {
            dir: d.clone(),
            name: "bad name".into(),
            ips: vec![],
            dns: vec![],
            days: 5
        })
        .is_err());
    }
}
