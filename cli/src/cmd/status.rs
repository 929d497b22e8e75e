//! `overlayctl status`: cluster health on one screen. Every controller of `--controller`
//! is asked in turn (is it up, does it reach etcd: a lease listing needs etcd), then the
//! leases: used and free subnets, and agents whose lease is close to expiring (an agent
//! renews at a third of the TTL, so one under a third left has missed renewals), and keys
//! under the lease prefix that the controller does not serve as leases (a clash of two
//! leases of one node or of one VTEP MAC, a stray key, an unreadable value).

use std::time::{Duration, SystemTime};

use anyhow::anyhow;
use overlay_proto::v1;
use serde::Serialize;

use crate::client::{self, ControllerUrls};
use crate::output::{self, short_duration, Format, Table};

#[derive(Debug, Serialize)]
pub struct ControllerHealth {
    pub url: String,
    pub reachable: bool,
    pub etcd: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ExpiringLease {
    pub node: String,
    pub subnet: String,
    pub expires_in_secs: u64,
}

#[derive(Debug, Serialize)]
pub struct IgnoredKey {
    pub key: String,
    pub reason: String,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub controllers: Vec<ControllerHealth>,
    pub network: Option<String>,
    pub backend: Option<String>,
    pub leases_used: usize,
    pub subnets_free: Option<u64>,
    pub expiring: Vec<ExpiringLease>,
    /// Keys under the lease prefix that are not served (never routed).
    pub ignored: Vec<IgnoredKey>,
}

pub async fn run(controllers: &ControllerUrls, format: Format) -> anyhow::Result<()> {
    let mut health = Vec::new();
    let mut summary = None;
    for url in controllers.urls() {
        let one = ControllerUrls::single(url);
        let mut h = ControllerHealth {
            url: url.clone(),
            reachable: false,
            etcd: false,
            error: None,
        };
        match client::connect(&one).await {
            Err(e) => h.error = Some(format!("{e:#}")),
            Ok(ctl) => {
                h.reachable = true;
                let config = ctl
                    .call(ctl.agent().get_config(v1::GetConfigRequest {}))
                    .await;
                let leases = ctl
                    .call(ctl.agent().list_leases(v1::ListLeasesRequest {}))
                    .await;
                match (config, leases) {
                    (Ok(c), Ok(l)) => {
                        h.etcd = true;
                        summary.get_or_insert((c, l));
                    }
                    (Err(e), _) | (_, Err(e)) => h.error = Some(format!("{e:#}")),
                }
            }
        }
        health.push(h);
    }
    let status = build(health, summary, SystemTime::now())?;
    output::print(&render(&status, format))?;
    if status.controllers.iter().all(|c| !c.etcd) {
        return Err(anyhow!(
            "no controller could answer with the cluster's state"
        ));
    }
    Ok(())
}

fn build(
    controllers: Vec<ControllerHealth>,
    summary: Option<(v1::GetConfigResponse, v1::ListLeasesResponse)>,
    now: SystemTime,
) -> anyhow::Result<ClusterStatus> {
    let mut status = ClusterStatus {
        controllers,
        network: None,
        backend: None,
        leases_used: 0,
        subnets_free: None,
        expiring: Vec::new(),
        ignored: Vec::new(),
    };
    let Some((config, leases)) = summary else {
        return Ok(status);
    };
    let config = config
        .config
        .ok_or_else(|| anyhow!("the controller sent no config"))?;
    let config = overlay_proto::config_from_proto(&config)
        .map_err(|e| anyhow!("invalid config from the controller: {e}"))?;
    let listed = crate::cmd::list_leases::from_proto(&leases.leases)?;
    let range = config.key_pool().range();
    let in_range = listed
        .iter()
        .filter(|(l, _)| range.contains(l.subnet))
        .count() as u128;
    status.network = Some(config.networks_text());
    status.backend = Some(config.backend.kind.to_string());
    status.leases_used = listed.len();
    status.subnets_free = Some(range.len().saturating_sub(in_range).min(u64::MAX as u128) as u64);
    status.ignored = leases
        .ignored
        .iter()
        .map(|i| IgnoredKey {
            key: i.key.clone(),
            reason: i.reason.clone(),
            detail: i.detail.clone(),
        })
        .collect();
    let warn_below = config.lease_ttl / 3;
    for (lease, expires) in &listed {
        if let Some(left) =
            expires.and_then(|e| e.duration_since(now).ok().or(Some(Duration::ZERO)))
        {
            if left < warn_below {
                status.expiring.push(ExpiringLease {
                    node: lease.node().to_string(),
                    subnet: lease.subnet.to_string(),
                    expires_in_secs: left.as_secs(),
                });
            }
        }
    }
    Ok(status)
}

pub fn render(s: &ClusterStatus, format: Format) -> String {
    if format == Format::Json {
        return output::json_pretty(s);
    }
    let mut t = Table::with_header(&["controller", "reachable", "etcd", "error"]);
    for c in &s.controllers {
        let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
        t.row([
            c.url.clone(),
            yes(c.reachable),
            yes(c.etcd),
            c.error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = t.render();
    if let Some(network) = &s.network {
        out.push_str(&format!(
            "\nnetwork {network} ({}): {} leases, {} subnets free\n",
            s.backend.as_deref().unwrap_or("?"),
            s.leases_used,
            s.subnets_free.unwrap_or(0)
        ));
        if s.expiring.is_empty() {
            out.push_str("no lease is close to expiry\n");
        } else {
            out.push_str("\nleases close to expiry (their agents miss renewals):\n");
            let mut e = Table::with_header(&["node", "subnet", "expires in"]);
            for x in &s.expiring {
                e.row([
                    x.node.clone(),
                    x.subnet.clone(),
                    short_duration(Duration::from_secs(x.expires_in_secs)),
                ]);
            }
            out.push_str(&e.render());
        }
        if !s.ignored.is_empty() {
            out.push_str(&format!(
                "\n{} key(s) under the lease prefix ignored (not served, never routed):\n",
                s.ignored.len()
            ));
            for i in &s.ignored {
                // The key is whatever someone wrote to etcd: escaped like every field.
                out.push_str(&format!(
                    "ignored {} ({}): {}\n",
                    crate::output::escape(&i.key),
                    crate::output::escape(&i.reason),
                    crate::output::escape(&i.detail)
                ));
            }
        }
    }
    out
}
