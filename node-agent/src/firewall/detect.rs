//! `--firewall auto`: what the host already uses, found by looking (reads only) and decided
//! by a pure function, so the rule is tested without a host. The rule itself, and why it
//! is that rule, is in the module doc of `firewall`.

use std::collections::HashMap;
use std::ffi::OsString;

use super::iptables::{parse_save, TableDump};
use super::{FirewallError, FirewallKind, Iptables, IptablesMode, Tool};

/// Rules and user chains found in one iptables mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// `-A` rules plus user-defined chains.
    pub entries: usize,
    /// Whether Docker's chains (`DOCKER`, `DOCKER-USER`, ...) are among them.
    pub docker: bool,
}

/// What `auto` looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `nft` is installed.
    pub nft: bool,
    /// iptables-nft's save and restore tools are installed.
    pub iptables_nft: bool,
    /// iptables-legacy's save and restore tools are installed.
    pub iptables_legacy: bool,
    /// What iptables-legacy (IPv4 and IPv6) holds.
    pub legacy_rules: Rules,
    /// What iptables-nft holds.
    pub nft_iptables_rules: Rules,
    /// nft shows tables iptables-nft makes (`ip filter`, `ip nat`): only looked at when
    /// no iptables-nft tool is installed.
    pub iptables_nft_tables: bool,
}

const BUILT_IN: [&str; 5] = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"];

/// Counts the rules and user chains of a save dump.
pub fn count(tables: &HashMap<String, TableDump>) -> Rules {
    let mut r = Rules::default();
    for t in tables.values() {
        let user: Vec<&String> = t
            .chains
            .iter()
            .filter(|c| !BUILT_IN.contains(&c.as_str()))
            .collect();
        r.entries += t.rules.len() + user.len();
        r.docker |= user.iter().any(|c| c.starts_with("DOCKER"));
    }
    r
}

impl HostFacts {
    /// Looks at this host (the calling thread's network namespace), tools from `path`.
    /// Only reads: save tools list tables that exist without creating any.
    pub fn gather(path: &OsString) -> HostFacts {
        let nft = Tool::find("nft", path);
        let legacy = Iptables::find(IptablesMode::Legacy, path).ok();
        let nft_ipt = Iptables::find(IptablesMode::Nft, path).ok();
        let mut legacy_rules = legacy
            .as_ref()
            .and_then(|i| i.dump().ok())
            .map(|d| count(&d))
            .unwrap_or_default();
        if let Some(v6) = Tool::find("ip6tables-legacy-save", path) {
            if let Ok(text) = v6.read(&[]) {
                let more = count(&parse_save(&text));
                legacy_rules.entries += more.entries;
                legacy_rules.docker |= more.docker;
            }
        }
        let nft_iptables_rules = nft_ipt
            .as_ref()
            .and_then(|i| i.dump().ok())
            .map(|d| count(&d))
            .unwrap_or_default();
        let iptables_nft_tables = nft_ipt.is_none()
            && nft
                .as_ref()
                .and_then(|n| n.read(&["list", "tables"]).ok())
                .is_some_and(|t| {
                    t.lines()
                        .any(|l| matches!(l.trim(), "table ip filter" | "table ip nat"))
                });
        HostFacts {
            nft: nft.is_some(),
            iptables_nft: nft_ipt.is_some(),
            iptables_legacy: legacy.is_some(),
            legacy_rules,
            nft_iptables_rules,
            iptables_nft_tables,
        }
    }
}

fn describe(n: &Rules) -> String {
    let docker = if n.docker {
        " (Docker's among them)"
    } else {
        ""
    };
    format!("{} rules and chains{docker}", n.entries)
}

/// The implementation `auto` picks for a host with `facts`, and why (for the log and
/// `/status`).
pub fn choose(facts: &HostFacts) -> Result<(FirewallKind, String), FirewallError> {
    if facts.iptables_legacy && facts.legacy_rules.entries > 0 {
        return Ok((
            FirewallKind::IptablesLegacy,
            format!("iptables-legacy holds {}", describe(&facts.legacy_rules)),
        ));
    }
    if facts.iptables_nft {
        let why = if facts.nft_iptables_rules.entries > 0 {
            format!("iptables-nft holds {}", describe(&facts.nft_iptables_rules))
        } else {
            "iptables-nft is installed, no legacy rules: Docker would use it".to_string()
        };
        return Ok((FirewallKind::IptablesNft, why));
    }
    if facts.nft {
        let why = if facts.iptables_nft_tables {
            "only nft is installed, but nft shows iptables' tables (ip filter/nat): their \
             FORWARD policy still applies"
        } else {
            "only nft is installed (no iptables tools)"
        };
        return Ok((FirewallKind::Nftables, why.to_string()));
    }
    if facts.iptables_legacy {
        return Ok((
            FirewallKind::IptablesLegacy,
            "only iptables-legacy is installed".to_string(),
        ));
    }
    Err(FirewallError::new(
        "--firewall auto",
        "neither nft nor iptables(-nft/-legacy)-save/-restore found in PATH: install nftables \
         or iptables, or pass --firewall none if something else manages the firewall",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_tools() -> HostFacts {
        HostFacts {
            nft: true,
            iptables_nft: true,
            iptables_legacy: true,
            ..Default::default()
        }
    }

    fn rules(entries: usize, docker: bool) -> Rules {
        Rules { entries, docker }
    }

    #[test]
    fn legacy_rules_win() {
        let f = HostFacts {
            legacy_rules: rules(12, true),
            nft_iptables_rules: rules(3, false),
            ..all_tools()
        };
        let (kind, why) = choose(&f).unwrap();
        assert_eq!(kind, FirewallKind::IptablesLegacy);
        assert_eq!(
            why,
            "iptables-legacy holds 12 rules and chains (Docker's among them)"
        );
    }

    #[test]
    fn docker_on_iptables_nft_means_iptables_nft() {
        let f = HostFacts {
            nft_iptables_rules: rules(20, true),
            ..all_tools()
        };
        let (kind, why) = choose(&f).unwrap();
        assert_eq!(kind, FirewallKind::IptablesNft);
        assert!(why.contains("Docker's among them"), "{why}");
        // A clean host with the distribution's iptables: still iptables-nft.
        assert_eq!(choose(&all_tools()).unwrap().0, FirewallKind::IptablesNft);
    }

    #[test]
    fn nft_only_hosts_get_nftables() {
        let f = HostFacts {
            nft: true,
            ..Default::default()
        };
        assert_eq!(choose(&f).unwrap().0, FirewallKind::Nftables);
        let f = HostFacts {
            iptables_nft_tables: true,
            ..f
        };
        let (kind, why) = choose(&f).unwrap();
        assert_eq!(kind, FirewallKind::Nftables);
        assert!(why.contains("FORWARD policy"), "{why}");
    }

    #[test]
    fn legacy_only_and_nothing() {
        let f = HostFacts {
            iptables_legacy: true,
            ..Default::default()
        };
        assert_eq!(choose(&f).unwrap().0, FirewallKind::IptablesLegacy);
        let e = choose(&HostFacts::default()).unwrap_err();
        assert!(e.to_string().contains("--firewall none"), "{e}");
    }

    #[test]
    fn counting_skips_built_in_chains() {
        let dump = parse_save(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\nCOMMIT\n",
        );
        assert_eq!(count(&dump), rules(2, true));
        assert_eq!(
            count(&parse_save("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n")),
            rules(0, false)
        );
    }
}
