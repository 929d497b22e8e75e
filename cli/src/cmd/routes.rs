//! `overlayctl routes --node NAME`: the entries a node should have, computed from the
//! leases with the same plan the agent runs (`overlay_core::datapath::plan`), so what this
//! prints is exactly what the agent converges to. Peers that get no entry are reported
//! on stderr with the reason (e.g. a host-gw peer that is not on the same L2 segment).

use anyhow::{anyhow, Context};
use clap::Args;
use ipnet::{IpNet, Ipv4Net};
use overlay_core::datapath::{plan, HostNet};
use overlay_proto::v1;
use serde::Serialize;

use crate::client::{self, ControllerUrls};
use crate::output::{self, Format, Table};

#[derive(Debug, Args)]
pub struct RoutesArgs {
    /// The node whose entries to show
    #[arg(long)]
    pub node: String,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RouteJson {
    pub subnet: String,
    pub via: String,
    pub dev: String,
    pub kind: String,
    pub onlink: bool,
    /// The peer the route leads to.
    pub peer: String,
    /// VXLAN only: the peer's VTEP MAC (neighbour entry) and public IP (FDB entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fdb_dst: Option<String>,
}

pub async fn run(
    args: RoutesArgs,
    controllers: &ControllerUrls,
    format: Format,
) -> anyhow::Result<()> {
    overlay_core::lease::validate_node_name(&args.node).context("--node")?;
    let ctl = client::connect(controllers).await?;
    let config = ctl
        .call(ctl.agent().get_config(v1::GetConfigRequest {}))
        .await?;
    let config = overlay_proto::config_from_proto(
        &config
            .config
            .ok_or_else(|| anyhow!("the controller sent no config"))?,
    )
    .map_err(|e| anyhow!("the controller sent an invalid config: {e}"))?;
    let listed = ctl
        .call(ctl.agent().list_leases(v1::ListLeasesRequest {}))
        .await?;
    let leases = crate::cmd::list_leases::from_proto(&listed.leases)?;
    let leases: Vec<_> = leases.into_iter().map(|(l, _)| l).collect();
    let own = leases
        .iter()
        .find(|l| l.node() == args.node)
        .ok_or_else(|| {
            let mut nodes: Vec<&str> = leases.iter().map(|l| l.node()).collect();
            nodes.sort();
            anyhow!(
                "--node: no lease is held by {:?} (nodes: {})",
                args.node,
                nodes.join(", ")
            )
        })?;
    let data = &own.record.backend_data;
    let host = HostNet {
        public_ip: own.record.public_ip,
        public_ipv6: own.record.public_ipv6,
        iface: data
            .iface
            .clone()
            .unwrap_or_else(|| "<public iface>".into()),
        underlay: data.underlay.or_else(|| {
            own.record
                .public_ip
                .map(|ip| Ipv4Net::new(ip, 32).expect("/32"))
        }),
        underlay_v6: data.underlay_v6.or_else(|| {
            own.record
                .public_ipv6
                .map(|ip| ipnet::Ipv6Net::new(ip, 128).expect("/128"))
        }),
    };
    let desired = plan(&config, own, &leases, &host);
    let node_of = |subnet: IpNet| {
        leases
            .iter()
            .find(|l| l.subnets().contains(&subnet))
            .map(|l| l.node().to_string())
            .unwrap_or_default()
    };
    for (subnet, why) in &desired.skipped {
        eprintln!(
            "overlayctl: warning: peer {subnet} ({}) gets no entry: {}",
            output::escape(&node_of(*subnet)),
            output::escape(&why.to_string())
        );
    }
    let rows: Vec<RouteJson> = desired
        .routes
        .values()
        .map(|r| {
            let peer = leases.iter().find(|l| l.subnets().contains(&r.dst));
            let vtep = (r.kind.as_str() == "vxlan").then_some(peer).flatten();
            let mac = vtep.and_then(|p| p.record.backend_data.vtep_mac);
            let fdb_dst = desired
                .fdb
                .iter()
                .find(|f| f.dev == r.dev && Some(f.mac) == mac)
                .map(|f| f.dst.to_string());
            RouteJson {
                subnet: r.dst.to_string(),
                via: r.via.to_string(),
                dev: r.dev.clone(),
                kind: r.kind.as_str().to_string(),
                onlink: r.onlink,
                peer: peer.map(|p| p.node().to_string()).unwrap_or_default(),
                vtep_mac: vtep
                    .and_then(|p| p.record.backend_data.vtep_mac)
                    .map(|m| m.to_string()),
                fdb_dst,
            }
        })
        .collect();
    output::print(&render(&rows, format))?;
    Ok(())
}

pub fn render(rows: &[RouteJson], format: Format) -> String {
    match format {
        Format::Json => output::json_pretty(rows),
        Format::Table => {
            let mut t = Table::with_header(&["subnet", "via", "dev", "kind", "peer"]);
            for r in rows {
                let via = if r.onlink {
                    format!("{} onlink", r.via)
                } else {
                    r.via.clone()
                };
                t.row([
                    r.subnet.clone(),
                    via,
                    r.dev.clone(),
                    r.kind.clone(),
                    r.peer.clone(),
                ]);
            }
            t.render()
        }
    }
}
