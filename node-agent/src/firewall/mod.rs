//! Packet-filter rules: FORWARD accepts for the cluster network and, with `--ip-masq`,
//! masquerading of traffic that leaves it. One set of rules ([`FirewallRules::forward`],
//! [`FirewallRules::masquerade`]) and one [`Firewall`] per way of installing them:
//!
//! - [`nftables::Nftables`]: a table of Overlay's own, `inet overlay`, written in one
//!   transaction (`nft -f -`) and read back with `nft -j list table inet overlay`.
//! - [`iptables::Iptables`] in two modes, iptables-nft and iptables-legacy: chains of
//!   Overlay's own (`OVERLAY-FORWARD` in filter, jumped to from FORWARD;
//!   `OVERLAY-POSTROUTING` in nat, jumped to from POSTROUTING), read with
//!   `iptables-{nft,legacy}-save` and written with `iptables-{nft,legacy}-restore --noflush`.
//! - [`none::NoFirewall`]: `--firewall none`, for hosts whose firewall is managed by
//!   someone else; nothing is read or written.
//!
//! Every implementation is reconciled like the datapath: the rules are desired state,
//! `ensure` reads what is installed and writes only when it differs, so a restart with the
//! rules in place issues no write command at all. What differs inside Overlay's own table
//! or chains (a rule deleted or added by hand) is put back; nothing outside them is read as
//! Overlay's or ever changed. Each implementation counts the write commands it issued
//! ([`Firewall::writes`]), which is how the tests prove "no write", not just "no change".
//!
//! **Why more than one implementation.** In nftables every base chain registered at a hook
//! sees the packet, and a drop in any of them is final: an `accept` in our own table ends
//! the packet's walk through *our* table only. dockerd sets the FORWARD policy to DROP (in
//! `ip filter` when it uses iptables-nft, in the legacy tables when it uses
//! iptables-legacy), so a native `inet overlay` forward chain cannot let the cluster's
//! traffic through on such a host; an accept inside the very chain that drops can. On a
//! host where Docker (or kube-proxy) uses iptables, the iptables implementation of the
//! same flavour is therefore the right one, and `auto` picks it. Legacy and nft rules are
//! two separate worlds as well: rules in one are invisible to tools of the other.
//!
//! **`auto`** ([`detect::choose`], facts from [`detect::HostFacts::gather`]), first match:
//! 1. iptables-legacy holds any rule or user chain (`iptables-legacy-save`,
//!    `ip6tables-legacy-save`): iptables-legacy, the host's rules live there (Docker's too
//!    when it uses legacy).
//! 2. iptables-nft is installed (`iptables-nft-save` and `-restore` in PATH, or `iptables`
//!    reporting `nf_tables`): iptables-nft. Its rules (Docker's `DOCKER*` chains, if any)
//!    are logged as the reason; with none yet it is still chosen, because Docker starts
//!    after the agent (it needs subnet.env) and will put its FORWARD DROP there.
//! 3. `nft` is installed: nftables (the reason says so when nft shows iptables-nft's
//!    `ip filter` or `ip nat` tables without an iptables-nft tool to add to them).
//! 4. only iptables-legacy is installed: iptables-legacy.
//! 5. nothing: an error asking for a firewall tool or `--firewall none`.
//!
//! This follows kube-proxy's iptables wrapper (use the mode that already holds rules,
//! legacy first) and Flannel (iptables by default). The choice and its reason are logged
//! and shown on `/status`.
//!
//! **IPv6.** Rules are built over [`IpNet`], with the family's own multicast range, and
//! rendered per family (`ip`/`ip6` matches in the `inet` table, which covers both; the
//! iptables implementation would use the `ip6tables` tools for IPv6 networks). Adding a
//! dual-stack network means adding its IPv6 network to [`FirewallRules::networks`].

use std::ffi::OsString;
use std::sync::Arc;

use ipnet::IpNet;

pub mod detect;
#[cfg(any(test, feature = "testing"))]
mod fake;
pub mod iptables;
pub mod nftables;
pub mod none;
mod tool;

#[cfg(any(test, feature = "testing"))]
pub use fake::FakeFirewall;
pub use iptables::{Iptables, IptablesMode};
pub use nftables::Nftables;
pub use none::NoFirewall;
pub use tool::{find_program, Tool};

/// The rules the forwarding backends want on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallRules {
    /// The cluster networks, one per address family: forwarded both ways, and not
    /// masqueraded inside themselves.
    pub networks: Vec<IpNet>,
    /// Masquerade traffic from the cluster network to anywhere else (`--ip-masq`).
    pub masquerade: bool,
}

/// What a rule does with a packet it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Accept,
    /// Leave this chain (nat: no address translation by us).
    Return,
    /// Source NAT to the outgoing interface's address, ports fully randomised
    /// (`--random-fully`, nft `fully-random`).
    Masquerade,
}

/// One rule, in the terms every implementation renders: optional source and destination
/// networks (of one family) and an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub action: Action,
}

/// The multicast range of a network's family (never masqueraded).
pub fn multicast(net: &IpNet) -> IpNet {
    match net {
        IpNet::V4(_) => "224.0.0.0/4".parse().expect("valid"),
        IpNet::V6(_) => "ff00::/8".parse().expect("valid"),
    }
}

impl FirewallRules {
    /// The cluster networks, one per address family.
    pub fn networks(&self) -> Vec<IpNet> {
        self.networks.clone()
    }

    /// Forwarding: accept from and to the cluster network.
    pub fn forward(&self) -> Vec<Rule> {
        self.networks()
            .into_iter()
            .flat_map(|n| {
                [
                    Rule {
                        src: Some(n),
                        dst: None,
                        action: Action::Accept,
                    },
                    Rule {
                        src: None,
                        dst: Some(n),
                        action: Action::Accept,
                    },
                ]
            })
            .collect()
    }

    /// Masquerading (empty without `--ip-masq`): traffic that stays inside the cluster
    /// network, and multicast, keeps its source; the rest leaving the cluster network is
    /// masqueraded.
    pub fn masquerade(&self) -> Vec<Rule> {
        if !self.masquerade {
            return Vec::new();
        }
        self.networks()
            .into_iter()
            .flat_map(|n| {
                [
                    Rule {
                        src: Some(n),
                        dst: Some(n),
                        action: Action::Return,
                    },
                    Rule {
                        src: Some(n),
                        dst: Some(multicast(&n)),
                        action: Action::Return,
                    },
                    Rule {
                        src: Some(n),
                        dst: None,
                        action: Action::Masquerade,
                    },
                ]
            })
            .collect()
    }
}

/// A host's packet filter, as the agent drives it: one implementation per tool, and a
/// recording fake for tests. Like the datapath, it is reconciled: `ensure` compares and
/// writes only what differs.
pub trait Firewall: Send + Sync {
    /// The implementation's name as `--firewall` spells it (`nftables`, `iptables-nft`,
    /// `iptables-legacy`, `none`).
    fn name(&self) -> &'static str;

    /// Makes Overlay's rules equal `rules`; whether anything was written.
    fn ensure(&self, rules: &FirewallRules) -> Result<bool, FirewallError>;

    /// Removes everything this implementation makes (table or chains and jumps); whether
    /// anything was there.
    fn cleanup(&self) -> Result<bool, FirewallError>;

    /// Write commands issued so far (0 after a restart into rules already in place).
    fn writes(&self) -> u64 {
        0
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct FirewallError {
    pub what: String,
    pub message: String,
}

impl FirewallError {
    pub fn new(what: impl Into<String>, message: impl Into<String>) -> Self {
        FirewallError {
            what: what.into(),
            message: message.into(),
        }
    }
}

/// `--firewall`: which implementation, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirewallKind {
    Auto,
    Nftables,
    IptablesNft,
    IptablesLegacy,
    /// Whatever the `iptables` command is (nft or legacy, from its `--version`).
    Iptables,
    None,
}

impl std::str::FromStr for FirewallKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => FirewallKind::Auto,
            "nftables" => FirewallKind::Nftables,
            "iptables-nft" => FirewallKind::IptablesNft,
            "iptables-legacy" => FirewallKind::IptablesLegacy,
            "iptables" => FirewallKind::Iptables,
            "none" => FirewallKind::None,
            other => {
                return Err(format!(
                    "{other:?}: use auto, nftables, iptables-nft, iptables-legacy, iptables or none"
                ))
            }
        })
    }
}

impl FirewallKind {
    /// As `--firewall` spells it.
    pub fn name(self) -> &'static str {
        match self {
            FirewallKind::Auto => "auto",
            FirewallKind::Nftables => "nftables",
            FirewallKind::IptablesNft => "iptables-nft",
            FirewallKind::IptablesLegacy => "iptables-legacy",
            FirewallKind::Iptables => "iptables",
            FirewallKind::None => "none",
        }
    }
}

/// The implementation chosen for this host, and why.
pub struct Selected {
    pub firewall: Arc<dyn Firewall>,
    pub reason: String,
}

/// The search path for the firewall tools: `PATH`, or the usual sbin directories.
pub fn search_path() -> OsString {
    std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into())
}

/// The implementation `kind` names (tools looked up in `path`); `auto` decides from the
/// host ([`detect::choose`]).
pub fn select(kind: FirewallKind, path: &OsString) -> Result<Selected, FirewallError> {
    let (kind, reason) = match kind {
        FirewallKind::Auto => {
            let facts = detect::HostFacts::gather(path);
            let (kind, why) = detect::choose(&facts)?;
            (kind, format!("auto: {why}"))
        }
        FirewallKind::Iptables => {
            let mode = iptables::system_mode(path)?;
            let kind = match mode {
                IptablesMode::Nft => FirewallKind::IptablesNft,
                IptablesMode::Legacy => FirewallKind::IptablesLegacy,
            };
            (
                kind,
                format!(
                    "--firewall iptables: the iptables command is {}",
                    mode.name()
                ),
            )
        }
        k => (k, "chosen with --firewall".to_string()),
    };
    let firewall: Arc<dyn Firewall> = match kind {
        FirewallKind::Nftables => Arc::new(Nftables::find(path)?),
        FirewallKind::IptablesNft => Arc::new(Iptables::find(IptablesMode::Nft, path)?),
        FirewallKind::IptablesLegacy => Arc::new(Iptables::find(IptablesMode::Legacy, path)?),
        FirewallKind::None => Arc::new(NoFirewall),
        FirewallKind::Auto | FirewallKind::Iptables => unreachable!("resolved above"),
    };
    Ok(Selected { firewall, reason })
}

/// `overlay-agent --cleanup`: removes Overlay's rules from the implementation `kind`
/// names, or with `auto` from every implementation whose tools are installed (an agent
/// may have run with another choice before). One line per implementation looked at.
pub fn cleanup(kind: FirewallKind, path: &OsString) -> Vec<(String, Result<bool, FirewallError>)> {
    let kinds = match kind {
        FirewallKind::Auto => vec![
            FirewallKind::Nftables,
            FirewallKind::IptablesNft,
            FirewallKind::IptablesLegacy,
        ],
        k => vec![k],
    };
    let mut done = Vec::new();
    for k in kinds {
        let explicit = kind != FirewallKind::Auto;
        match select(k, path) {
            Ok(s) => done.push((s.firewall.name().to_string(), s.firewall.cleanup())),
            // With auto, a tool that is not installed holds nothing of ours.
            Err(e) if explicit => done.push((k.name().to_string(), Err(e))),
            Err(_) => {}
        }
    }
    done
}

/// Removes Overlay's rules from every implementation but `chosen` (rules an agent left
/// while it ran with another choice, e.g. before `auto` found iptables-nft installed by
/// Docker): the agent maintains one implementation, and stale rules in another would keep
/// masquerading after `--ip-masq` is turned off. Nothing is removed with `none`: the
/// operator runs the firewall then. What was removed, or could not be, per implementation.
pub fn remove_others(
    chosen: &dyn Firewall,
    path: &OsString,
) -> Vec<(String, Result<bool, FirewallError>)> {
    if chosen.name() == FirewallKind::None.name() {
        return Vec::new();
    }
    [
        FirewallKind::Nftables,
        FirewallKind::IptablesNft,
        FirewallKind::IptablesLegacy,
    ]
    .into_iter()
    .filter_map(|k| select(k, path).ok())
    .filter(|s| s.firewall.name() != chosen.name())
    .map(|s| (s.firewall.name().to_string(), s.firewall.cleanup()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_rules_for_every_implementation() {
        let rules = FirewallRules {
            networks: vec!["10.244.0.0/16".parse().unwrap()],
            masquerade: true,
        };
        let n: IpNet = "10.244.0.0/16".parse().unwrap();
        assert_eq!(rules.forward().len(), 2);
        let m = rules.masquerade();
        assert_eq!(
            m[0],
            Rule {
                src: Some(n),
                dst: Some(n),
                action: Action::Return
            }
        );
        assert_eq!(m[1].dst, Some("224.0.0.0/4".parse().unwrap()));
        assert_eq!(m[2].action, Action::Masquerade);
        let off = FirewallRules {
            masquerade: false,
            ..rules
        };
        assert!(off.masquerade().is_empty());
    }

    #[test]
    fn kinds_parse() {
        assert_eq!("auto".parse(), Ok(FirewallKind::Auto));
        assert_eq!("iptables".parse(), Ok(FirewallKind::Iptables));
        assert_eq!("iptables-legacy".parse(), Ok(FirewallKind::IptablesLegacy));
        assert!("ufw".parse::<FirewallKind>().is_err());
    }
}
