//! `overlayctl docker-opts`: dockerd's flags for this host's lease, from `subnet.env`.
//!
//! The Flannel way of putting Docker on the overlay: the agent runs with `--bridge none`
//! (Docker owns the bridge), and dockerd's default bridge takes the host's subnet
//! (`--bip`, the gateway address with its prefix, exactly `OVERLAY_SUBNET`) and the
//! overlay's MTU. When the agent masquerades (`OVERLAY_IPMASQ=true`), Docker must not as
//! well, or traffic between hosts would be masqueraded too: hence `--ip-masq=false`.
//! Nothing here talks to the controller: `subnet.env` is the agent's word on the lease.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use overlay_core::subnet::gateway;
use overlay_core::subnet_env::{SubnetEnv, MAX_SUBNET_ENV_BYTES};
use serde::Serialize;

use crate::output::{json_pretty, print, Format};

pub const DEFAULT_SUBNET_FILE: &str = "/run/overlay/subnet.env";

#[derive(Debug, Args)]
pub struct DockerOptsArgs {
    /// The agent's subnet.env
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DockerOpts {
    /// dockerd --bip: the bridge's address with the subnet's prefix (none in an
    /// IPv6-only cluster).
    pub bip: Option<String>,
    /// dockerd --fixed-cidr-v6: the host's IPv6 subnet (with --ipv6), when it has one.
    pub fixed_cidr_v6: Option<String>,
    pub mtu: u32,
    /// `Some(false)` when the agent masquerades, so dockerd must not.
    pub ip_masq: Option<bool>,
}

impl DockerOpts {
    /// From a `subnet.env`'s text (the one parser the agent and the CNI plugin use too).
    pub fn from_subnet_env(text: &str) -> Result<DockerOpts, String> {
        let env = SubnetEnv::parse(text)?;
        Ok(DockerOpts {
            bip: env.subnet.map(|s| gateway(s).to_string()),
            fixed_cidr_v6: env.ipv6_subnet.map(|s| s.to_string()),
            mtu: env.mtu,
            ip_masq: env.ip_masq.then_some(false),
        })
    }

    /// `--bip=10.244.7.1/24 [--ipv6 --fixed-cidr-v6=fd00:10:244:7::/64] --mtu=1450
    /// [--ip-masq=false]`.
    pub fn flags(&self) -> String {
        let mut parts = Vec::new();
        if let Some(bip) = &self.bip {
            parts.push(format!("--bip={bip}"));
        }
        if let Some(v6) = &self.fixed_cidr_v6 {
            parts.push(format!("--ipv6 --fixed-cidr-v6={v6}"));
        }
        parts.push(format!("--mtu={}", self.mtu));
        let mut s = parts.join(" ");
        if let Some(m) = self.ip_masq {
            s += &format!(" --ip-masq={m}");
        }
        s
    }
}

/// The file's text, refusing one larger than any `subnet.env` can be.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_SUBNET_ENV_BYTES as u64 + 1)
        .read_to_string(&mut text)?;
    if text.len() > MAX_SUBNET_ENV_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than any subnet.env",
        ));
    }
    Ok(text)
}

pub fn read(path: &Path) -> anyhow::Result<DockerOpts> {
    let text = match read_bounded(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist: is overlay-agent running on this host (with --bridge none for \
             Docker)? Use --subnet-file for another path",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    DockerOpts::from_subnet_env(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub async fn run(args: DockerOptsArgs, format: Format) -> anyhow::Result<()> {
    let opts = read(&args.subnet_file)?;
    match format {
        Format::Table => print(&format!("{}\n", opts.flags()))?,
        Format::Json => print(&json_pretty(&opts))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_from_subnet_env() {
        let text = "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=false\n";
        let opts = DockerOpts::from_subnet_env(text).unwrap();
        assert_eq!(opts.flags(), "--bip=10.244.7.1/24 --mtu=1450");
        let masq = text.replace("IPMASQ=false", "IPMASQ=true");
        assert_eq!(
            DockerOpts::from_subnet_env(&masq).unwrap().flags(),
            "--bip=10.244.7.1/24 --mtu=1450 --ip-masq=false"
        );
        assert!(
            DockerOpts::from_subnet_env("OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_MTU=1450\n")
                .unwrap_err()
                .contains("OVERLAY_SUBNET")
        );
        assert!(
            DockerOpts::from_subnet_env("OVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=x\n")
                .unwrap_err()
                .contains("OVERLAY_MTU=x")
        );
    }

    #[test]
    fn a_missing_file_says_what_to_do() {
        let e = read(Path::new("/nonexistent/subnet.env")).unwrap_err();
        assert!(e.to_string().contains("--subnet-file"), "{e}");
    }
}
