//! `overlayctl certs`: a small CA for a small cluster.
//!
//! `certs init` makes a CA; `certs issue --name NAME` a certificate whose common name is
//! NAME: a node's name (the controller then lets it act only for that node), `admin` (the
//! default admin identity of the controller), or `controller` with the addresses agents
//! dial in `--ip`/`--dns`. Every certificate is good for both server and client auth, so
//! one file serves a controller and its own calls. For larger clusters use your PKI:
//! Overlay only needs PEM files and a CN.
//!
//! Nothing is overwritten without `--force`, and no name may claim another's files: NAME
//! gets NAME.pem and NAME-key.pem, so "ca" (the CA's own files) and any name ending in
//! "-key" (NAME-key.pem is the key of NAME) are refused. Every file is written through
//! `overlay_common::durable`: a temp file created O_EXCL|O_NOFOLLOW (never a file or
//! symlink someone left in the directory), its mode set with fchmod (0600 for keys,
//! whatever the umask), fsynced, moved into place, and the directory fsynced.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use overlay_common::durable::{self, WriteOptions};
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
    /// Validity in days (1..36500)
    #[arg(long, default_value_t = 3650, value_parser = parse_days)]
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
    /// Validity in days (1..36500)
    #[arg(long, default_value_t = 825, value_parser = parse_days)]
    pub days: u32,
    /// Replace an existing certificate and key of this name
    #[arg(long)]
    pub force: bool,
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

/// Longest validity: a hundred years is already longer than any key should live; more
/// overflows the certificate's date.
pub const MAX_DAYS: u32 = 36_500;

fn parse_days(text: &str) -> Result<u32, String> {
    let days: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of days"))?;
    if (1..=MAX_DAYS).contains(&days) {
        Ok(days)
    } else {
        Err(format!("{days} is outside 1..{MAX_DAYS}"))
    }
}

/// Why NAME may not be issued, if it may not: its files would be another identity's.
pub fn reserved_name(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let rule = "NAME gets NAME.pem and NAME-key.pem, so \"ca\" (the CA's files) and \
                names ending in \"-key\" (the key file of another name) are reserved";
    if lower == "ca" {
        Some(format!("{name:?} is the CA's own name ({rule})"))
    } else if lower.ends_with("-key") {
        Some(format!(
            "{name:?} would collide with the key of {:?} ({rule})",
            &name[..name.len() - 4]
        ))
    } else if name.starts_with('.') {
        Some(format!(
            "{name:?} starts with '.' (hidden files and temp files are not identities)"
        ))
    } else {
        None
    }
}

/// Refuses, before anything is written, when one of `paths` exists and `force` is off.
fn refuse_existing(paths: &[&Path], force: bool, what: &str) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    for p in paths {
        if std::fs::symlink_metadata(p).is_ok() {
            bail!("{} exists: pass --force to replace {what}", p.display());
        }
    }
    Ok(())
}

/// Writes a key (0600) and its certificate (0644) durably; without `force` neither may
/// exist, and a key written for a certificate that then fails is removed again.
fn write_pair(
    key_path: &Path,
    key: &str,
    cert_path: &Path,
    cert: &str,
    force: bool,
) -> anyhow::Result<()> {
    let opts = |mode| {
        if force {
            WriteOptions::replace(mode)
        } else {
            WriteOptions::create_new(mode)
        }
    };
    let hint = |e: durable::FileError| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow!("{e} (pass --force to replace it)")
        } else {
            anyhow!(e)
        }
    };
    durable::write(key_path, key.as_bytes(), opts(0o600)).map_err(hint)?;
    if let Err(e) = durable::write(cert_path, cert.as_bytes(), opts(0o644)) {
        if !force {
            let _ = durable::remove(key_path);
        }
        return Err(hint(e));
    }
    Ok(())
}

pub fn init(a: &InitArgs) -> anyhow::Result<()> {
    if !(1..=MAX_DAYS).contains(&a.days) {
        bail!("--days: {} is outside 1..{MAX_DAYS}", a.days);
    }
    let (cert_path, key_path) = (a.dir.join("ca.pem"), a.dir.join("ca-key.pem"));
    refuse_existing(&[&cert_path, &key_path], a.force, "the CA")?;
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
    write_pair(
        &key_path,
        &key.serialize_pem(),
        &cert_path,
        &cert.pem(),
        a.force,
    )?;
    println!(
        "CA written: {} (key {})",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

pub fn issue(a: &IssueArgs) -> anyhow::Result<()> {
    if a.name.is_empty()
        // NAME-key.pem must fit a file name (255 bytes).
        || a.name.len() > 246
        || !a
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        bail!(
            "--name: {:?} is not a valid identity (1-246 letters, digits, '.', '-', '_')",
            a.name
        );
    }
    if let Some(why) = reserved_name(&a.name) {
        bail!("--name: {why}");
    }
    if !(1..=MAX_DAYS).contains(&a.days) {
        bail!("--days: {} is outside 1..{MAX_DAYS}", a.days);
    }
    let (cert_path, key_path) = (
        a.dir.join(format!("{}.pem", a.name)),
        a.dir.join(format!("{}-key.pem", a.name)),
    );
    refuse_existing(&[&cert_path, &key_path], a.force, &format!("{:?}", a.name))?;
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
    write_pair(
        &key_path,
        &key.serialize_pem(),
        &cert_path,
        &cert.pem(),
        a.force,
    )?;
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
    use overlay_common::tls::TlsFiles;

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
            force: false,
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
            days: 5,
            force: false,
        })
        .is_err());
    }

    #[test]
    fn names_that_would_take_another_identitys_files_are_reserved() {
        for name in ["ca", "CA", "node-a-key", "ca-key", ".hidden"] {
            assert!(reserved_name(name).is_some(), "{name}");
        }
        for name in ["node-a", "admin", "controller", "keymaster", "node-keys"] {
            assert_eq!(reserved_name(name), None, "{name}");
        }
        let why = reserved_name("node-a-key").unwrap();
        assert!(why.contains("\"node-a\"") && why.contains("-key"), "{why}");
        assert_eq!(parse_days("1"), Ok(1));
        assert!(parse_days("0").is_err());
        assert!(parse_days("36501").is_err());
    }
}
