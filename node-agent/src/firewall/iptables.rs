//! iptables, through either of its two back ends: iptables-nft (rules in nftables'
//! `ip filter` / `ip nat` tables, through the kernel's nf_tables API) or iptables-legacy
//! (the x_tables API). The two keep separate rule sets, so the mode must be the one the
//! host's other tools (Docker, kube-proxy) use: see the module doc of `firewall`.
//!
//! Layout, the same as before nftables support:
//!
//! ```text
//! *filter   -A FORWARD -j OVERLAY-FORWARD          (one jump, inserted first)
//!           -A OVERLAY-FORWARD -s 10.244.0.0/16 -j ACCEPT
//!           -A OVERLAY-FORWARD -d 10.244.0.0/16 -j ACCEPT
//! *nat      -A POSTROUTING -j OVERLAY-POSTROUTING  (only with --ip-masq)
//!           -A OVERLAY-POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN
//!           -A OVERLAY-POSTROUTING -s 10.244.0.0/16 -d 224.0.0.0/4 -j RETURN
//!           -A OVERLAY-POSTROUTING -s 10.244.0.0/16 -j MASQUERADE --random-fully
//! ```
//!
//! Reading is one `iptables-<mode>-save` (every table, in the same `-A ...` syntax the
//! rules are written in); writing is one `iptables-<mode>-restore --noflush` with only
//! what differs: a chain whose rules differ is declared (which flushes it) and refilled, a
//! missing jump is inserted first in its built-in chain, extra copies of the jump are
//! deleted. restore commits each table in one step, so a chain is never seen half filled,
//! and the other rules of the table are left as they are (`--noflush`). A jump that is
//! present but no longer first is left where it is: moving it would fight whoever put a
//! rule above it. Legacy tables that do not exist are not created by reading (save lists
//! only tables already loaded), so `--cleanup` on a host that never used legacy changes
//! nothing there.

use std::collections::HashMap;
use std::ffi::OsString;

use ipnet::IpNet;
use tracing::info;

use super::{find_program, Action, Firewall, FirewallError, FirewallRules, Rule, Tool};

pub const FORWARD_CHAIN: &str = "OVERLAY-FORWARD";
pub const MASQ_CHAIN: &str = "OVERLAY-POSTROUTING";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesMode {
    Nft,
    Legacy,
}

impl IptablesMode {
    pub fn name(self) -> &'static str {
        match self {
            IptablesMode::Nft => "iptables-nft",
            IptablesMode::Legacy => "iptables-legacy",
        }
    }
}

/// The mode of the plain `iptables` command, from its `--version` ("(nf_tables)" or
/// "(legacy)"; iptables before 1.8 has no nft mode and says neither).
pub fn system_mode(path: &OsString) -> Result<IptablesMode, FirewallError> {
    let tool = Tool::find("iptables", path).ok_or_else(|| {
        FirewallError::new(
            "--firewall iptables",
            "iptables not found in PATH; install the iptables package",
        )
    })?;
    let version = tool.read(&["--version"])?;
    Ok(if version.contains("nf_tables") {
        IptablesMode::Nft
    } else {
        IptablesMode::Legacy
    })
}

pub struct Iptables {
    mode: IptablesMode,
    save: Tool,
    restore: Tool,
}

/// One of our chains: its table, the built-in chain that jumps to it, and its rules as
/// `-A CHAIN ...` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub table: &'static str,
    pub chain: &'static str,
    pub hook: &'static str,
    pub rules: Vec<String>,
}

impl ChainSpec {
    fn jump(&self) -> String {
        format!("-A {} -j {}", self.hook, self.chain)
    }
}

/// One table of an `iptables-save` dump: its chains and its rules, in order.
#[derive(Debug, Default)]
pub struct TableDump {
    pub chains: Vec<String>,
    pub rules: Vec<String>,
}

impl Iptables {
    /// `iptables-<mode>-save` and `-restore` from `path`; failing those, the unsuffixed
    /// `iptables-save`/`-restore` when `iptables` itself runs in `mode`.
    pub fn find(mode: IptablesMode, path: &OsString) -> Result<Self, FirewallError> {
        let name = mode.name();
        let pair = |prefix: &str| {
            Some((
                Tool::find(&format!("{prefix}-save"), path)?,
                Tool::find(&format!("{prefix}-restore"), path)?,
            ))
        };
        let tools = pair(name).or_else(|| {
            let plain =
                find_program("iptables", path).is_some() && system_mode(path).ok() == Some(mode);
            if plain {
                pair("iptables")
            } else {
                None
            }
        });
        let (save, restore) = tools.ok_or_else(|| {
            FirewallError::new(
                name,
                format!("{name}-save and {name}-restore not found in PATH; install the iptables package"),
            )
        })?;
        Ok(Iptables {
            mode,
            save,
            restore,
        })
    }

    pub fn mode(&self) -> IptablesMode {
        self.mode
    }

    /// Every table the save tool shows.
    pub fn dump(&self) -> Result<HashMap<String, TableDump>, FirewallError> {
        Ok(parse_save(&self.save.read(&[])?))
    }

    /// Applies a restore script (nothing when empty).
    fn restore(&self, script: &str) -> Result<bool, FirewallError> {
        if script.is_empty() {
            return Ok(false);
        }
        self.restore.write(&["-w", "--noflush"], Some(script))?;
        Ok(true)
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        self.mode.name()
    }

    fn ensure(&self, rules: &FirewallRules) -> Result<bool, FirewallError> {
        let dump = self.dump()?;
        let forward = forward_chain(rules);
        let mut script = ensure_script(&forward, &dump);
        match masq_chain(rules) {
            Some(masq) => script += &ensure_script(&masq, &dump),
            None => script += &remove_script("nat", "POSTROUTING", MASQ_CHAIN, &dump),
        }
        if !script.is_empty() {
            info!(mode = self.mode.name(), changes = %script.replace('\n', "; "), "iptables: bringing Overlay's chains back to its rules");
        }
        self.restore(&script)
    }

    fn cleanup(&self) -> Result<bool, FirewallError> {
        let dump = self.dump()?;
        let mut script = remove_script("filter", "FORWARD", FORWARD_CHAIN, &dump);
        script += &remove_script("nat", "POSTROUTING", MASQ_CHAIN, &dump);
        self.restore(&script)
    }

    fn writes(&self) -> u64 {
        self.restore.writes()
    }
}

/// A rule as iptables writes it: `-A CHAIN -s 10.244.0.0/16 -j ACCEPT`.
pub fn render_rule(chain: &str, rule: &Rule) -> String {
    let mut s = format!("-A {chain}");
    if let Some(src) = rule.src {
        s += &format!(" -s {src}");
    }
    if let Some(dst) = rule.dst {
        s += &format!(" -d {dst}");
    }
    s += match rule.action {
        Action::Accept => " -j ACCEPT",
        Action::Return => " -j RETURN",
        Action::Masquerade => " -j MASQUERADE --random-fully",
    };
    s
}

fn v4_only(rules: Vec<Rule>) -> impl Iterator<Item = Rule> {
    // IPv6 networks go to the ip6tables tools once the rules carry one.
    rules
        .into_iter()
        .filter(|r| !matches!(r.src.or(r.dst), Some(IpNet::V6(_))))
}

/// The FORWARD chain for `rules`.
pub fn forward_chain(rules: &FirewallRules) -> ChainSpec {
    ChainSpec {
        table: "filter",
        chain: FORWARD_CHAIN,
        hook: "FORWARD",
        rules: v4_only(rules.forward())
            .map(|r| render_rule(FORWARD_CHAIN, &r))
            .collect(),
    }
}

/// The masquerading chain, when `rules` ask for masquerading.
pub fn masq_chain(rules: &FirewallRules) -> Option<ChainSpec> {
    let masq = rules.masquerade();
    (!masq.is_empty()).then(|| ChainSpec {
        table: "nat",
        chain: MASQ_CHAIN,
        hook: "POSTROUTING",
        rules: v4_only(masq).map(|r| render_rule(MASQ_CHAIN, &r)).collect(),
    })
}

/// Parses `iptables-save` output: per table, the chains declared and the rules.
pub fn parse_save(text: &str) -> HashMap<String, TableDump> {
    let mut tables: HashMap<String, TableDump> = HashMap::new();
    let mut current = None;
    for line in text.lines().map(str::trim_end) {
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t.to_string());
            tables.entry(t.to_string()).or_default();
        } else if let (Some(t), Some(decl)) = (&current, line.strip_prefix(':')) {
            let name = decl.split_whitespace().next().unwrap_or_default();
            tables.get_mut(t).expect("table").chains.push(name.into());
        } else if let (Some(t), true) = (&current, line.starts_with("-A ")) {
            tables.get_mut(t).expect("table").rules.push(line.into());
        }
    }
    tables
}

/// The restore block (`*table ... COMMIT`) that makes `spec` hold, or "" when it does.
pub fn ensure_script(spec: &ChainSpec, dump: &HashMap<String, TableDump>) -> String {
    let empty = TableDump::default();
    let table = dump.get(spec.table).unwrap_or(&empty);
    let prefix = format!("-A {} ", spec.chain);
    let have: Vec<&String> = table
        .rules
        .iter()
        .filter(|r| r.starts_with(&prefix))
        .collect();
    let exists = table.chains.iter().any(|c| c == spec.chain);
    let jump = spec.jump();
    let jumps = table.rules.iter().filter(|r| **r == jump).count();
    let mut lines = Vec::new();
    if !exists
        || have
            .iter()
            .map(|s| s.as_str())
            .ne(spec.rules.iter().map(String::as_str))
    {
        lines.push(format!(":{} - [0:0]", spec.chain));
        lines.extend(spec.rules.iter().cloned());
    }
    if jumps == 0 {
        lines.push(format!("-I {} 1 -j {}", spec.hook, spec.chain));
    }
    for _ in 1..jumps.max(1) {
        lines.push(format!("-D {} -j {}", spec.hook, spec.chain));
    }
    block(spec.table, lines)
}

/// The restore block that removes `chain` and its jumps from `hook`, or "" when neither
/// exists.
pub fn remove_script(
    table: &str,
    hook: &str,
    chain: &str,
    dump: &HashMap<String, TableDump>,
) -> String {
    let Some(t) = dump.get(table) else {
        return String::new();
    };
    let jump = format!("-A {hook} -j {chain}");
    let mut lines: Vec<String> = t
        .rules
        .iter()
        .filter(|r| **r == jump)
        .map(|_| format!("-D {hook} -j {chain}"))
        .collect();
    if t.chains.iter().any(|c| c == chain) {
        lines.push(format!("-F {chain}"));
        lines.push(format!("-X {chain}"));
    }
    block(table, lines)
}

fn block(table: &str, lines: Vec<String>) -> String {
    if lines.is_empty() {
        return String::new();
    }
    format!("*{table}\n{}\nCOMMIT\n", lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> FirewallRules {
        FirewallRules {
            networks: vec!["10.244.0.0/16".parse().unwrap()],
            masquerade: true,
        }
    }

    const SAVED: &str = "# Generated by iptables-save v1.8.9 on Fri Dec  4 16:51:28 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [3:180]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:OVERLAY-FORWARD - [0:0]
-A FORWARD -j OVERLAY-FORWARD
-A FORWARD -j DOCKER
-A DOCKER -s 198.51.100.0/24 -j ACCEPT
-A OVERLAY-FORWARD -s 10.244.0.0/16 -j ACCEPT
-A OVERLAY-FORWARD -d 10.244.0.0/16 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 198.51.100.0/24 -j MASQUERADE
COMMIT
";

    #[test]
    fn rules_keep_cluster_traffic_unmasqueraded() {
        let m = masq_chain(&rules()).unwrap();
        assert_eq!(
            m.rules,
            [
                "-A OVERLAY-POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
                "-A OVERLAY-POSTROUTING -s 10.244.0.0/16 -d 224.0.0.0/4 -j RETURN",
                "-A OVERLAY-POSTROUTING -s 10.244.0.0/16 -j MASQUERADE --random-fully",
            ]
        );
        assert_eq!(forward_chain(&rules()).rules.len(), 2);
    }

    #[test]
    fn only_what_differs_is_written() {
        let dump = parse_save(SAVED);
        assert_eq!(dump["filter"].chains.len(), 5);
        assert_eq!(ensure_script(&forward_chain(&rules()), &dump), "");
        let nat = ensure_script(&masq_chain(&rules()).unwrap(), &dump);
        assert!(
            nat.starts_with("*nat\n:OVERLAY-POSTROUTING - [0:0]\n"),
            "{nat}"
        );
        assert!(
            nat.ends_with("-I POSTROUTING 1 -j OVERLAY-POSTROUTING\nCOMMIT\n"),
            "{nat}"
        );
        // A foreign rule in our chain: the chain is refilled, the jump left alone.
        let drifted = SAVED.replace(
            "COMMIT\n*nat",
            "-A OVERLAY-FORWARD -s 198.51.100.0/24 -j ACCEPT\n-A FORWARD -j OVERLAY-FORWARD\nCOMMIT\n*nat",
        );
        let s = ensure_script(&forward_chain(&rules()), &parse_save(&drifted));
        assert_eq!(
            s,
            "*filter\n:OVERLAY-FORWARD - [0:0]\n-A OVERLAY-FORWARD -s 10.244.0.0/16 -j ACCEPT\n-A OVERLAY-FORWARD -d 10.244.0.0/16 -j ACCEPT\n-D FORWARD -j OVERLAY-FORWARD\nCOMMIT\n"
        );
    }

    #[test]
    fn removal_touches_only_our_chain() {
        let dump = parse_save(SAVED);
        assert_eq!(
            remove_script("filter", "FORWARD", FORWARD_CHAIN, &dump),
            "*filter\n-D FORWARD -j OVERLAY-FORWARD\n-F OVERLAY-FORWARD\n-X OVERLAY-FORWARD\nCOMMIT\n"
        );
        assert_eq!(remove_script("nat", "POSTROUTING", MASQ_CHAIN, &dump), "");
        assert_eq!(
            remove_script("mangle", "POSTROUTING", MASQ_CHAIN, &dump),
            ""
        );
    }
}
