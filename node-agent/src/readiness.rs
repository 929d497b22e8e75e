//! What the agent tells the host once its datapath works: `subnet.env` (for Docker and the
//! CNI plugin), the CNI conflist (so runtimes find the network only when it works), and
//! systemd's READY=1 / STATUS= / WATCHDOG=1 (Type=notify; no-ops outside systemd).
//!
//! Readiness is published after a reconcile, never before: a runtime that sees the conflist
//! or `subnet.env` can start workloads at once, and they must have a network.

use std::path::PathBuf;

use overlay_core::subnet_env::SubnetEnv;
use tracing::info;

use crate::files::{write_atomic, FileError};
pub use overlay_core::host_files::{CNI_CONFLIST, SUBNET_ENV};

pub struct Readiness {
    run_dir: PathBuf,
    cni_conf_dir: Option<PathBuf>,
    cni_data_dir: Option<PathBuf>,
    /// `None` with `--bridge none`: no conflist then.
    bridge: Option<String>,
    published: Option<SubnetEnv>,
}

impl Readiness {
    pub fn new(
        run_dir: PathBuf,
        cni_conf_dir: Option<PathBuf>,
        cni_data_dir: Option<PathBuf>,
        bridge: Option<String>,
    ) -> Self {
        Readiness {
            run_dir,
            cni_conf_dir,
            cni_data_dir,
            bridge,
            published: None,
        }
    }

    pub fn subnet_env_path(&self) -> PathBuf {
        self.run_dir.join(SUBNET_ENV)
    }

    /// Writes `subnet.env` and the conflist when `env` differs from what was published,
    /// and tells systemd the agent is ready; whether anything was (re)published.
    pub fn publish(&mut self, env: &SubnetEnv) -> Result<bool, FileError> {
        if self.published.as_ref() == Some(env) {
            return Ok(false);
        }
        let path = self.subnet_env_path();
        write_atomic(&path, env.render().as_bytes())?;
        info!(subnet = ?env.subnet, ipv6_subnet = ?env.ipv6_subnet, path = %path.display(), "subnet.env written; ready");
        self.install_cni_conf()?;
        self.published = Some(env.clone());
        notify(sd_notify::NotifyState::Ready);
        Ok(true)
    }

    /// Writes `<cni-conf-dir>/10-overlay.conflist` (only when it differs).
    fn install_cni_conf(&self) -> Result<(), FileError> {
        let (Some(dir), Some(bridge)) = (&self.cni_conf_dir, &self.bridge) else {
            return Ok(());
        };
        let path = dir.join(CNI_CONFLIST);
        let text = crate::cni::conflist(
            "overlay",
            &self.subnet_env_path(),
            bridge,
            self.cni_data_dir.as_deref(),
        );
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            write_atomic(&path, text.as_bytes())?;
            info!(path = %path.display(), "CNI network config installed");
        }
        Ok(())
    }
}

/// A STATUS= line for systemd.
pub fn status(text: &str) {
    notify(sd_notify::NotifyState::Status(text));
}

/// WATCHDOG=1: the main loop is alive.
pub fn watchdog() {
    notify(sd_notify::NotifyState::Watchdog);
}

/// How often to ping systemd's watchdog, when it watches this process.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

fn notify(state: sd_notify::NotifyState<'_>) {
    let _ = sd_notify::notify(&[state]);
}
