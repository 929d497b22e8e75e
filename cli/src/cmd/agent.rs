//! `overlayctl agent status [--agent URL]`: what one agent has programmed against what it
//! should have, and which firewall it uses and when it last repaired it, from the agent's
//! own health endpoint (`/status`).

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::output::{self, Format, Table};

pub const DEFAULT_AGENT: &str = "http://127.0.0.1:7402";

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// The agent's lease, peers, last reconcile, drift and skipped peers
    Status(AgentStatusArgs),
}

#[derive(Debug, Args)]
pub struct AgentStatusArgs {
    /// The agent's health endpoint
    #[arg(long, env = "OVERLAY_AGENT", default_value = DEFAULT_AGENT, value_name = "URL")]
    pub agent: String,
}

/// Splits `http://host:port` into host and port.
pub fn parse_agent_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--agent: {url:?} must start with http://"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--agent: {url:?} has no port"))?;
    let port = port
        .parse()
        .with_context(|| format!("--agent: {port:?} is not a port"))?;
    Ok((host.to_string(), port))
}

pub async fn run(cmd: AgentCommand, format: Format) -> anyhow::Result<()> {
    let AgentCommand::Status(args) = cmd;
    let (host, port) = parse_agent_url(&args.agent)?;
    let (h, p) = (host.clone(), port);
    let answer =
        tokio::task::spawn_blocking(move || overlay_lab::http_get(&h, p, "/status")).await?;
    let Some((code, body)) = answer else {
        bail!("cannot reach the agent at {}: is overlay-agent running with --health-listen {host}:{port}?", args.agent)
    };
    if code != 200 {
        bail!("the agent at {} answered HTTP {code}", args.agent);
    }
    let status: Value = serde_json::from_str(&body)
        .with_context(|| format!("the agent at {} sent invalid JSON", args.agent))?;
    output::print(&render(&status, format))?;
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn render(status: &Value, format: Format) -> String {
    if format == Format::Json {
        return output::json_pretty(status);
    }
    let mut t = Table::plain();
    for key in [
        "node",
        "ready",
        "backend",
        "public_ip",
        "subnet",
        "mtu",
        "lease_expires_at",
        "last_renewal",
        "peers",
        "reconciles",
        "datapath_writes",
        "last_error",
    ] {
        t.row([key.replace('_', " "), text(&status[key])]);
    }
    let fw = &status["firewall"];
    if !fw.is_null() {
        t.row(["firewall".to_string(), text(&fw["implementation"])]);
        t.row(["firewall reason".to_string(), text(&fw["reason"])]);
        t.row(["firewall repairs".to_string(), text(&fw["repairs"])]);
        t.row(["firewall last repair".to_string(), text(&fw["last_repair"])]);
    }
    let r = &status["last_reconcile"];
    if !r.is_null() {
        t.row(["entries desired".to_string(), text(&r["desired"])]);
        t.row(["entries found".to_string(), text(&r["observed"])]);
        t.row(["drift repaired".to_string(), text(&r["drift_count"])]);
    }
    let mut out = t.render();
    let list = |title: &str, items: &Value, out: &mut String| {
        if let Some(items) = items.as_array().filter(|a| !a.is_empty()) {
            out.push_str(&format!("\n{title}:\n"));
            for i in items {
                let line = match i {
                    Value::Array(pair) => pair.iter().map(text).collect::<Vec<_>>().join(": "),
                    other => text(other),
                };
                out.push_str(&format!("  {}\n", output::escape(&line)));
            }
        }
    };
    list(
        "drift (operations the last reconcile needed)",
        &r["drift"],
        &mut out,
    );
    list("peers not programmed", &r["skipped"], &mut out);
    list("errors", &r["errors"], &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls() {
        assert_eq!(
            parse_agent_url("http://127.0.0.1:7402").unwrap(),
            ("127.0.0.1".into(), 7402)
        );
        assert!(parse_agent_url("127.0.0.1:7402").is_err());
        assert!(parse_agent_url("http://host").is_err());
    }

    #[test]
    fn renders_drift_and_skipped_peers() {
        let s: Value = serde_json::json!({
            "node": "h1", "ready": true, "subnet": "10.244.7.0/24", "peers": 2,
            "last_reconcile": {"desired": 3, "observed": 2, "drift_count": 1,
                "drift": ["add route 10.244.8.0/24 via 192.0.2.12 dev eth0"],
                "skipped": [["10.244.9.0/24", "not directly reachable (not on 192.0.2.0/24)"]],
                "errors": []}
        });
        let out = render(&s, Format::Table);
        assert!(
            out.contains("drift repaired") && out.contains("add route 10.244.8.0/24"),
            "{out}"
        );
        assert!(!out.contains("firewall"), "{out}");
        assert!(
            out.contains("10.244.9.0/24: not directly reachable"),
            "{out}"
        );
    }

    #[test]
    fn renders_the_firewall() {
        let s: Value = serde_json::json!({
            "node": "h1",
            "firewall": {"implementation": "nftables", "reason": "auto: only nft is installed",
                "repairs": 2, "last_repair": "2026-12-04T16:00:00Z"}
        });
        let out = render(&s, Format::Table);
        for want in [
            "firewall",
            "nftables",
            "auto: only nft is installed",
            "firewall repairs",
            "2026-12-04T16:00:00Z",
        ] {
            assert!(out.contains(want), "{want}: {out}");
        }
    }
}
