//! Packet-filter rules: FORWARD accepts for the cluster network, and (with `--ip-masq`)
//! masquerading of traffic that leaves the cluster network.
//!
//! Every rule lives in the agent's own chains (`OVERLAY-FORWARD` in filter,
//! `OVERLAY-POSTROUTING` in nat), reached by one jump rule each. Reconciling compares the
//! chain's listing with the wanted rules and rewrites the chain only when they differ, so
//! an unchanged host sees no writes, someone else's rules are never touched, and removal
//! is "delete the jump, flush and delete the chain".
//!
//! The `iptables` command is used rather than raw nftables: on Debian and most current
//! distributions it is `iptables-nft`, which writes nftables rules through the kernel's
//! nf_tables API, so the same code works on hosts managed with nft and on legacy ones.
//! FORWARD matters even without masquerading: dockerd sets the FORWARD policy to DROP.

use std::process::Command;

use ipnet::Ipv4Net;
use tracing::warn;

/// The rules the forwarding backends want on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirewallRules {
    /// The cluster network: forwarded both ways, and not masqueraded inside itself.
    pub network: Ipv4Net,
    /// Masquerade traffic from the cluster network to anywhere else (`--ip-masq`).
    pub masquerade: bool,
}

/// A host's packet filter, as the agent drives it: one implementation per tool
/// ([`Iptables`] today), and a recording fake for tests. Like the datapath, it is
/// reconciled: `ensure` compares and writes only what differs.
pub trait Firewall: Send + Sync {
    /// Makes the agent's rules equal `rules`; whether anything was written.
    fn ensure(&self, rules: &FirewallRules) -> Result<bool, FirewallError>;
}

/// The `iptables` command (iptables-nft on current distributions).
pub struct Iptables;

impl Firewall for Iptables {
    fn ensure(&self, rules: &FirewallRules) -> Result<bool, FirewallError> {
        let mut wrote = ensure_chain(&forward_rules(rules.network))?;
        if rules.masquerade {
            wrote |= ensure_chain(&masq_rules(rules.network))?;
        } else {
            for e in remove_chain("nat", "POSTROUTING", MASQ_CHAIN) {
                warn!(error = %e, "could not remove old masquerade rules");
            }
        }
        Ok(wrote)
    }
}

/// Records the rules asked for instead of installing them.
#[cfg(any(test, feature = "testing"))]
#[derive(Default)]
pub struct FakeFirewall {
    pub ensured: std::sync::Mutex<Vec<FirewallRules>>,
}

#[cfg(any(test, feature = "testing"))]
impl Firewall for FakeFirewall {
    fn ensure(&self, rules: &FirewallRules) -> Result<bool, FirewallError> {
        let mut ensured = self.ensured.lock().expect("firewall");
        let changed = ensured.last() != Some(rules);
        ensured.push(*rules);
        Ok(changed)
    }
}

pub const FORWARD_CHAIN: &str = "OVERLAY-FORWARD";
pub const MASQ_CHAIN: &str = "OVERLAY-POSTROUTING";

#[derive(Debug, thiserror::Error)]
#[error("iptables {args}: {message}")]
pub struct FirewallError {
    args: String,
    message: String,
}

fn iptables(args: &[&str]) -> Result<String, FirewallError> {
    let fail = |message: String| FirewallError {
        args: args.join(" "),
        message,
    };
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| {
            fail(format!(
                "cannot run iptables ({e}); install the iptables package"
            ))
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The rules of one of our chains, as `iptables -S` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub table: &'static str,
    pub chain: &'static str,
    /// The built-in chain that jumps to ours.
    pub hook: &'static str,
    pub rules: Vec<String>,
}

/// The FORWARD rules for `network`.
pub fn forward_rules(network: Ipv4Net) -> ChainSpec {
    ChainSpec {
        table: "filter",
        chain: FORWARD_CHAIN,
        hook: "FORWARD",
        rules: vec![
            format!("-A {FORWARD_CHAIN} -s {network} -j ACCEPT"),
            format!("-A {FORWARD_CHAIN} -d {network} -j ACCEPT"),
        ],
    }
}

/// Masquerading for traffic from the cluster network to anywhere else; traffic that stays
/// inside the cluster network (and multicast) keeps its source address.
pub fn masq_rules(network: Ipv4Net) -> ChainSpec {
    ChainSpec {
        table: "nat",
        chain: MASQ_CHAIN,
        hook: "POSTROUTING",
        rules: vec![
            format!("-A {MASQ_CHAIN} -s {network} -d {network} -j RETURN"),
            format!("-A {MASQ_CHAIN} -s {network} -d 224.0.0.0/4 -j RETURN"),
            format!("-A {MASQ_CHAIN} -s {network} -j MASQUERADE --random-fully"),
        ],
    }
}

/// Makes the chain hold exactly its rules and be jumped to; returns whether it wrote.
pub fn ensure_chain(spec: &ChainSpec) -> Result<bool, FirewallError> {
    let mut wrote = false;
    let listing = match iptables(&["-t", spec.table, "-S", spec.chain]) {
        Ok(l) => l,
        Err(_) => {
            iptables(&["-t", spec.table, "-N", spec.chain])?;
            wrote = true;
            String::new()
        }
    };
    let have: Vec<&str> = listing.lines().filter(|l| l.starts_with("-A ")).collect();
    if have != spec.rules.iter().map(String::as_str).collect::<Vec<_>>() {
        iptables(&["-t", spec.table, "-F", spec.chain])?;
        for rule in &spec.rules {
            let args: Vec<&str> = rule.split_whitespace().collect();
            let mut full = vec!["-t", spec.table];
            full.extend(args);
            iptables(&full)?;
        }
        wrote = true;
    }
    if iptables(&["-t", spec.table, "-C", spec.hook, "-j", spec.chain]).is_err() {
        iptables(&["-t", spec.table, "-I", spec.hook, "1", "-j", spec.chain])?;
        wrote = true;
    }
    Ok(wrote)
}

/// Removes the jump and the chain; missing pieces are fine. Reports every failure.
pub fn remove_chain(table: &str, hook: &str, chain: &str) -> Vec<FirewallError> {
    let mut errors = Vec::new();
    while iptables(&["-t", table, "-C", hook, "-j", chain]).is_ok() {
        if let Err(e) = iptables(&["-t", table, "-D", hook, "-j", chain]) {
            errors.push(e);
            break;
        }
    }
    if iptables(&["-t", table, "-S", chain]).is_ok() {
        errors.extend(iptables(&["-t", table, "-F", chain]).err());
        errors.extend(iptables(&["-t", table, "-X", chain]).err());
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_keep_cluster_traffic_unmasqueraded() {
        let n: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let m = masq_rules(n);
        assert_eq!(
            m.rules[0],
            "-A OVERLAY-POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN"
        );
        assert!(m
            .rules
            .last()
            .unwrap()
            .ends_with("-j MASQUERADE --random-fully"));
        assert_eq!(forward_rules(n).rules.len(), 2);
    }
}
