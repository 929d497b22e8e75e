//! Native nftables: Overlay's rules in a table of its own, `inet overlay` (the `inet`
//! family holds IPv4 and IPv6 rules alike), with two base chains:
//!
//! ```text
//! table inet overlay {
//!     chain forward {          type filter hook forward priority filter; policy accept;
//!         ip saddr 10.244.0.0/16 counter accept
//!         ip daddr 10.244.0.0/16 counter accept }
//!     chain postrouting {      type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 counter return
//!         ip saddr 10.244.0.0/16 ip daddr 224.0.0.0/4 counter return
//!         ip saddr 10.244.0.0/16 counter masquerade fully-random }   # only with --ip-masq
//! }
//! ```
//!
//! `fully-random` is what iptables' `--random-fully` becomes in nft (`iptables-translate`
//! prints the same), so every implementation translates ports alike.
//!
//! Reading is `nft -j list table inet overlay`, parsed into the same [`Rule`]s the table
//! is rendered from; anything else found in the table (another chain, a rule we do not
//! make, a set) makes it differ. Writing replaces the whole table in one transaction fed
//! to `nft -f -`: "add the table (a no-op if it exists), delete it, add it with its
//! chains", which the kernel applies atomically, so no packet ever sees half a table.
//! Other tables are never named, so never touched.
//!
//! The JSON is read rather than the text listing because its shape is the format's
//! documented interface (libnftables-json(5)), while the text is meant for people; the
//! text is what the golden tests and the operators look at.
//!
//! The forward chain's accepts cannot override a drop by another table's base chain (a
//! packet must pass every base chain at the hook): see the module doc of `firewall`.

use std::ffi::OsString;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;
use tracing::info;

use super::{Action, Firewall, FirewallError, FirewallRules, Rule, Tool};

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "overlay";

pub struct Nftables {
    nft: Tool,
}

/// A base chain of our table, as wanted or as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// `filter` or `nat`; `None` for a regular (non-base) chain someone added.
    pub kind: Option<String>,
    pub hook: Option<String>,
    pub priority: Option<i64>,
    pub policy: Option<String>,
    pub rules: Vec<Found>,
}

/// A rule found in our table: one of ours, or something else (its JSON, for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Ours(Rule),
    Other(String),
}

/// What `nft -j list table inet overlay` showed: the chains, and any other object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableContents {
    pub chains: Vec<Chain>,
    pub others: Vec<String>,
}

impl Nftables {
    /// `nft` from `path`.
    pub fn find(path: &OsString) -> Result<Self, FirewallError> {
        let nft = Tool::find("nft", path).ok_or_else(|| {
            FirewallError::new(
                "nftables",
                "nft not found in PATH; install the nftables package",
            )
        })?;
        Ok(Nftables { nft })
    }

    /// Our table as installed; `None` when it does not exist.
    pub fn observe(&self) -> Result<Option<TableContents>, FirewallError> {
        match self.nft.read(&["-j", "list", "table", FAMILY, TABLE]) {
            Ok(json) => parse_table(&json).map(Some),
            Err(e) if e.message.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn ensure(&self, rules: &FirewallRules) -> Result<bool, FirewallError> {
        let want = desired(rules);
        let have = self.observe()?;
        let mut sorted = have.clone().unwrap_or_default();
        sorted.chains.sort_by(|a, b| a.name.cmp(&b.name));
        if have.is_some() && sorted.others.is_empty() && sorted.chains == want {
            return Ok(false);
        }
        match &have {
            None => info!("nftables: creating table {FAMILY} {TABLE}"),
            Some(t) => {
                info!(found = ?t, "nftables: table {FAMILY} {TABLE} differs from Overlay's rules; rewriting it")
            }
        }
        self.nft.write(&["-f", "-"], Some(&script(&want)))?;
        Ok(true)
    }

    fn cleanup(&self) -> Result<bool, FirewallError> {
        if self.observe()?.is_none() {
            return Ok(false);
        }
        self.nft.write(&["delete", "table", FAMILY, TABLE], None)?;
        Ok(true)
    }

    fn writes(&self) -> u64 {
        self.nft.writes()
    }
}

/// The chains our table should hold, sorted by name.
pub fn desired(rules: &FirewallRules) -> Vec<Chain> {
    let mut chains = vec![Chain {
        name: "forward".into(),
        kind: Some("filter".into()),
        hook: Some("forward".into()),
        priority: Some(0),
        policy: Some("accept".into()),
        rules: rules.forward().into_iter().map(Found::Ours).collect(),
    }];
    let masq = rules.masquerade();
    if !masq.is_empty() {
        chains.push(Chain {
            name: "postrouting".into(),
            kind: Some("nat".into()),
            hook: Some("postrouting".into()),
            priority: Some(100),
            policy: Some("accept".into()),
            rules: masq.into_iter().map(Found::Ours).collect(),
        });
    }
    chains
}

/// A rule as nft writes it: `ip saddr 10.244.0.0/16 counter accept`.
pub fn render_rule(rule: &Rule) -> String {
    let mut parts = Vec::new();
    for (net, field) in [(rule.src, "saddr"), (rule.dst, "daddr")] {
        if let Some(net) = net {
            let proto = match net {
                IpNet::V4(_) => "ip",
                IpNet::V6(_) => "ip6",
            };
            parts.push(format!("{proto} {field} {net}"));
        }
    }
    parts.push("counter".into());
    parts.push(
        match rule.action {
            Action::Accept => "accept",
            Action::Return => "return",
            Action::Masquerade => "masquerade fully-random",
        }
        .into(),
    );
    parts.join(" ")
}

fn priority_name(kind: &str, priority: i64) -> String {
    match (kind, priority) {
        ("filter", 0) => "filter".into(),
        ("nat", 100) => "srcnat".into(),
        (_, p) => p.to_string(),
    }
}

/// The transaction that replaces our table with `chains`.
pub fn script(chains: &[Chain]) -> String {
    let mut s = format!(
        "table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\ntable {FAMILY} {TABLE} {{\n"
    );
    for c in chains {
        s += &format!("\tchain {} {{\n", c.name);
        if let (Some(kind), Some(hook), Some(prio)) = (&c.kind, &c.hook, c.priority) {
            s += &format!(
                "\t\ttype {kind} hook {hook} priority {}; policy {};\n",
                priority_name(kind, prio),
                c.policy.as_deref().unwrap_or("accept")
            );
        }
        for r in &c.rules {
            if let Found::Ours(rule) = r {
                s += &format!("\t\t{}\n", render_rule(rule));
            }
        }
        s += "\t}\n";
    }
    s += "}\n";
    s
}

/// Parses `nft -j list table` output into chains and rules.
pub fn parse_table(json: &str) -> Result<TableContents, FirewallError> {
    let bad = |m: String| FirewallError::new(format!("nft -j list table {FAMILY} {TABLE}"), m);
    let v: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| bad("no \"nftables\" array".into()))?;
    let mut t = TableContents::default();
    for item in items {
        let Some((key, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        match key.as_str() {
            "metainfo" | "table" => {}
            "chain" => t.chains.push(Chain {
                name: body["name"].as_str().unwrap_or_default().to_string(),
                kind: body["type"].as_str().map(String::from),
                hook: body["hook"].as_str().map(String::from),
                priority: body["prio"].as_i64(),
                policy: body["policy"].as_str().map(String::from),
                rules: Vec::new(),
            }),
            "rule" => {
                let chain = body["chain"].as_str().unwrap_or_default();
                let rule = parse_rule(&body["expr"])
                    .map(Found::Ours)
                    .unwrap_or_else(|| Found::Other(body["expr"].to_string()));
                match t.chains.iter_mut().find(|c| c.name == chain) {
                    Some(c) => c.rules.push(rule),
                    None => t.others.push(item.to_string()),
                }
            }
            _ => t.others.push(item.to_string()),
        }
    }
    Ok(t)
}

/// One of our rules from its JSON expressions; `None` for anything we do not make.
fn parse_rule(expr: &Value) -> Option<Rule> {
    let mut rule = Rule {
        src: None,
        dst: None,
        action: Action::Accept,
    };
    let mut verdict = None;
    for e in expr.as_array()? {
        let (key, body) = e.as_object()?.iter().next()?;
        if verdict.is_some() {
            return None; // nothing of ours follows the verdict
        }
        match key.as_str() {
            "match" => {
                // "==" is the implicit operator; some nft versions leave it out.
                if !(body["op"].is_null() || body["op"] == "==") {
                    return None;
                }
                let left = &body["left"]["payload"];
                let net = parse_net(&body["right"])?;
                let want_proto = match net {
                    IpNet::V4(_) => "ip",
                    IpNet::V6(_) => "ip6",
                };
                if left["protocol"] != want_proto {
                    return None;
                }
                let slot = match left["field"].as_str()? {
                    "saddr" => &mut rule.src,
                    "daddr" => &mut rule.dst,
                    _ => return None,
                };
                if slot.replace(net).is_some() {
                    return None;
                }
            }
            "counter" => {}
            "accept" => verdict = Some(Action::Accept),
            "return" => verdict = Some(Action::Return),
            "masquerade" => {
                let flags: Vec<&str> = match &body["flags"] {
                    Value::String(f) => vec![f.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                };
                if flags != ["fully-random"] || body.get("port").is_some() {
                    return None;
                }
                verdict = Some(Action::Masquerade);
            }
            _ => return None,
        }
    }
    rule.action = verdict?;
    Some(rule)
}

/// `{"prefix": {"addr": "10.244.0.0", "len": 16}}` or a bare address.
fn parse_net(v: &Value) -> Option<IpNet> {
    if let Some(a) = v.as_str() {
        let addr: IpAddr = a.parse().ok()?;
        return Some(IpNet::from(addr));
    }
    let p = &v["prefix"];
    let addr: IpAddr = p["addr"].as_str()?.parse().ok()?;
    IpNet::new(addr, u8::try_from(p["len"].as_u64()?).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(masquerade: bool) -> FirewallRules {
        FirewallRules {
            networks: vec!["10.244.0.0/16".parse().unwrap()],
            masquerade,
        }
    }

    /// What nft 1.0.6 prints for the table `script` writes (handles and counters vary).
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
      {"table": {"family": "inet", "name": "overlay", "handle": 1}},
      {"chain": {"family": "inet", "table": "overlay", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
      {"chain": {"family": "inet", "table": "overlay", "name": "postrouting", "handle": 2, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
      {"rule": {"family": "inet", "table": "overlay", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"counter": {"packets": 7, "bytes": 588}}, {"accept": null}]}},
      {"rule": {"family": "inet", "table": "overlay", "chain": "forward", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
      {"rule": {"family": "inet", "table": "overlay", "chain": "postrouting", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}},
      {"rule": {"family": "inet", "table": "overlay", "chain": "postrouting", "handle": 6, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "224.0.0.0", "len": 4}}}}, {"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}},
      {"rule": {"family": "inet", "table": "overlay", "chain": "postrouting", "handle": 7, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"counter": {"packets": 0, "bytes": 0}}, {"masquerade": {"flags": "fully-random"}}]}}]}"#;

    #[test]
    fn the_listing_parses_back_into_the_rules_written() {
        let t = parse_table(LISTED).unwrap();
        assert!(t.others.is_empty(), "{:?}", t.others);
        assert_eq!(t.chains, desired(&rules(true)));
    }

    #[test]
    fn anything_else_in_the_table_differs() {
        let extra = LISTED.replace(
            r#"{"masquerade": {"flags": "fully-random"}}"#,
            r#"{"masquerade": null}"#,
        );
        let t = parse_table(&extra).unwrap();
        assert!(matches!(t.chains[1].rules[2], Found::Other(_)));
        assert_ne!(t.chains, desired(&rules(true)));
        let set = LISTED.replace(
            r#"{"table": {"family""#,
            r#"{"set": {"family": "inet", "name": "s"}}, {"table": {"family""#,
        );
        assert_eq!(parse_table(&set).unwrap().others.len(), 1);
    }

    #[test]
    fn the_script_replaces_the_table_in_one_go() {
        let s = script(&desired(&rules(true)));
        assert!(s.starts_with(
            "table inet overlay {}\ndelete table inet overlay\ntable inet overlay {\n"
        ));
        assert!(s.contains("type nat hook postrouting priority srcnat; policy accept;"));
        assert!(s.contains("\t\tip saddr 10.244.0.0/16 ip daddr 224.0.0.0/4 counter return\n"));
        assert!(s.contains("\t\tip saddr 10.244.0.0/16 counter masquerade fully-random\n"));
        assert!(!script(&desired(&rules(false))).contains("postrouting"));
    }
}
