//! The firewall implementations against the real tools, as root, each test in its own
//! anonymous network namespace (never the root namespace).
//!
//! Every test body runs on a dedicated OS thread that first calls `unshare(CLONE_NEWNET)`.
//! The implementations run `nft` and the iptables tools as child processes; a child
//! inherits the namespace of the *thread* that spawns it, and the body spawns them all
//! from that thread, which [`in_netns`] checks by asking a child which namespace it is in.
//!
//! What the rules look like is proven against golden files in `tests/golden/` at the
//! repository root, as the host's own tool prints them (`nft list table inet overlay`,
//! `iptables-{nft,legacy}-save` filtered to Overlay's chains and jumps), with counters
//! zeroed. `OVERLAY_UPDATE_GOLDEN=1` rewrites them from what the test sees.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use overlay_agent::firewall::detect::{choose, HostFacts};
use overlay_agent::firewall::{
    self, search_path, Firewall, FirewallKind, FirewallRules, Iptables, IptablesMode, Nftables,
};

/// Runs `body` in a fresh network namespace on its own thread; skips when not root.
fn in_netns(test: &str, body: impl FnOnce() + Send + 'static) {
    if !overlay_tests::is_root() {
        overlay_tests::skip(test, "needs root to create network namespaces");
        return;
    }
    let thread = std::thread::Builder::new()
        .name(test.to_string())
        .spawn(move || {
            let before = std::fs::read_link("/proc/thread-self/ns/net").expect("read netns");
            // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWNET only moves
            // this thread into a new network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            let mine = std::fs::read_link("/proc/thread-self/ns/net").expect("read netns");
            assert_ne!(
                before, mine,
                "the thread must be in a new network namespace"
            );
            let child = run("readlink", &["/proc/self/ns/net"]);
            assert_eq!(
                child.trim(),
                mine.to_string_lossy(),
                "a child spawned from this thread must be in its namespace"
            );
            body();
        })
        .expect("spawn test thread");
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

fn try_run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs a command in the calling thread's namespace; its stdout.
fn run(program: &str, args: &[&str]) -> String {
    try_run(program, args, None).unwrap_or_else(|e| panic!("{e}"))
}

fn sh(program: &str, line: &str) -> String {
    run(program, &line.split_whitespace().collect::<Vec<_>>())
}

fn rules(masquerade: bool) -> FirewallRules {
    FirewallRules {
        networks: vec!["10.244.0.0/16".parse().unwrap()],
        masquerade,
    }
}

/// Compares `actual` with `tests/golden/<name>`, or writes it there when asked to.
fn assert_golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name);
    if std::env::var_os("OVERLAY_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (OVERLAY_UPDATE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    assert_eq!(
        actual,
        want,
        "the rules differ from {} (OVERLAY_UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

/// Zeroes nft's `packets N bytes M` and iptables' `[N:M]` counters.
fn zero_counters(line: &str) -> String {
    let mut out = Vec::new();
    let mut words = line.split(' ').peekable();
    while let Some(w) = words.next() {
        out.push(w.to_string());
        if (w == "packets" || w == "bytes") && words.peek().is_some() {
            words.next();
            out.push("0".into());
        }
    }
    let s = out.join(" ");
    match (s.rfind(" ["), s.ends_with(']')) {
        (Some(i), true) if s.starts_with(':') => format!("{} [0:0]", &s[..i]),
        _ => s,
    }
}

/// One implementation as the test drives and reads it with the host's own tools.
trait Tools {
    fn name(&self) -> &'static str;
    fn make(&self) -> Box<dyn Firewall>;
    /// Overlay's rules as the tool prints them, counters zeroed ("" when none).
    fn ours(&self) -> String;
    /// Everything else the tool shows (another firewall's rules), counters zeroed.
    fn theirs(&self) -> String;
    /// Installs another firewall's rules next to ours.
    fn add_theirs(&self);
    /// Deletes one of our rules (and a jump, where there is one) by hand.
    fn delete_ours(&self);
    /// Adds a rule (and a chain or jump) of someone else inside our table or chains.
    fn meddle(&self);
}

struct Nft;

impl Tools for Nft {
    fn name(&self) -> &'static str {
        "nftables"
    }
    fn make(&self) -> Box<dyn Firewall> {
        Box::new(Nftables::find(&search_path()).unwrap())
    }
    fn ours(&self) -> String {
        match try_run("nft", &["list", "table", "inet", "overlay"], None) {
            Ok(t) => t.lines().map(|l| zero_counters(l) + "\n").collect(),
            Err(_) => String::new(),
        }
    }
    fn theirs(&self) -> String {
        let tables = run("nft", &["list", "tables"]);
        let mut out = String::new();
        for t in tables.lines().filter(|l| *l != "table inet overlay") {
            let words: Vec<&str> = t.split_whitespace().collect();
            out += &sh("nft", &format!("list table {} {}", words[1], words[2]));
        }
        out.lines().map(|l| zero_counters(l) + "\n").collect()
    }
    fn add_theirs(&self) {
        try_run(
            "nft",
            &["-f", "-"],
            Some(
                "table inet other {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n  ip saddr 198.51.100.0/24 counter drop\n }\n chain postrouting {\n  type nat hook postrouting priority 100;\n  ip saddr 198.51.100.0/24 masquerade\n }\n}\n",
            ),
        )
        .unwrap();
    }
    fn delete_ours(&self) {
        let listing = sh("nft", "-a list chain inet overlay postrouting");
        let handle = listing
            .lines()
            .find(|l| l.contains("masquerade"))
            .and_then(|l| l.rsplit("handle ").next())
            .unwrap_or_else(|| panic!("no masquerade rule:\n{listing}"))
            .trim()
            .to_string();
        sh(
            "nft",
            &format!("delete rule inet overlay postrouting handle {handle}"),
        );
    }
    fn meddle(&self) {
        sh(
            "nft",
            "add rule inet overlay forward ip saddr 198.51.100.0/24 accept",
        );
        sh("nft", "add chain inet overlay extra");
    }
}

struct Ipt(IptablesMode);

impl Ipt {
    fn cmd(&self, line: &str) -> String {
        sh(self.0.name(), line)
    }
    fn save(&self) -> String {
        run(&format!("{}-save", self.0.name()), &[])
    }
}

impl Tools for Ipt {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn make(&self) -> Box<dyn Firewall> {
        Box::new(Iptables::find(self.0, &search_path()).unwrap())
    }
    fn ours(&self) -> String {
        // Per table: its header, our chains' declarations, rules and jumps, COMMIT; the
        // tables sorted by name (legacy lists them in the kernel's order).
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        for line in self.save().lines() {
            if line.starts_with('*') {
                block = vec![line.to_string()];
            } else if line.contains("OVERLAY-") {
                block.push(zero_counters(line));
            } else if line == "COMMIT" && block.len() > 1 {
                block.push(line.into());
                blocks.push(block.join("\n") + "\n");
            }
        }
        blocks.sort();
        blocks.concat()
    }
    fn theirs(&self) -> String {
        self.save()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("OVERLAY-"))
            .map(|l| zero_counters(l) + "\n")
            .collect()
    }
    fn add_theirs(&self) {
        self.cmd("-N DOCKER");
        self.cmd("-A DOCKER -s 198.51.100.0/24 -j ACCEPT");
        self.cmd("-A FORWARD -j DOCKER");
        self.cmd("-P FORWARD DROP");
        self.cmd("-t nat -A POSTROUTING -s 198.51.100.0/24 -j MASQUERADE");
    }
    fn delete_ours(&self) {
        self.cmd("-t nat -D OVERLAY-POSTROUTING -s 10.244.0.0/16 -j MASQUERADE --random-fully");
        self.cmd("-D FORWARD -j OVERLAY-FORWARD");
    }
    fn meddle(&self) {
        self.cmd("-A OVERLAY-FORWARD -s 198.51.100.0/24 -j ACCEPT");
        self.cmd("-I FORWARD 1 -j OVERLAY-FORWARD");
    }
}

/// Everything an implementation must do, in one namespace.
fn reconciles_like_the_datapath(tools: &dyn Tools) {
    let name = tools.name();
    tools.add_theirs();
    let theirs = tools.theirs();
    assert!(!theirs.is_empty());
    let fw = tools.make();
    assert_eq!(fw.name(), name);

    // First install: one write command, the rules of the golden file.
    assert!(fw.ensure(&rules(true)).unwrap());
    assert_eq!(fw.writes(), 1, "{name}: one atomic write");
    assert_golden(&format!("{name}-ipv4.txt"), &tools.ours());
    let golden = tools.ours();

    // Ensure again, and after a restart (a new instance): nothing written.
    assert!(!fw.ensure(&rules(true)).unwrap());
    assert_eq!(fw.writes(), 1, "{name}: a second ensure wrote");
    let restarted = tools.make();
    assert!(!restarted.ensure(&rules(true)).unwrap());
    assert_eq!(restarted.writes(), 0, "{name}: a restart wrote");

    // A rule deleted by hand comes back.
    tools.delete_ours();
    assert_ne!(tools.ours(), golden, "{name}: the deletion took");
    assert!(fw.ensure(&rules(true)).unwrap());
    assert_eq!(tools.ours(), golden, "{name}: the deleted rule is back");

    // Someone else's rule inside our table or chains goes.
    tools.meddle();
    assert_ne!(tools.ours(), golden, "{name}: the foreign rule took");
    assert!(fw.ensure(&rules(true)).unwrap());
    assert_eq!(tools.ours(), golden, "{name}: the foreign rule is gone");
    assert!(!fw.ensure(&rules(true)).unwrap());

    // Masquerading off: only the forward rules stay.
    assert!(fw.ensure(&rules(false)).unwrap());
    assert_golden(&format!("{name}-ipv4-no-masq.txt"), &tools.ours());
    assert!(!fw.ensure(&rules(false)).unwrap());

    // The other firewall's rules were never touched.
    assert_eq!(
        tools.theirs(),
        theirs,
        "{name}: another firewall's rules changed"
    );

    // Cleanup removes exactly what was made.
    assert!(fw.cleanup().unwrap());
    assert_eq!(tools.ours(), "", "{name}: cleanup left rules");
    assert_eq!(
        tools.theirs(),
        theirs,
        "{name}: cleanup touched other rules"
    );
    let writes = fw.writes();
    assert!(!fw.cleanup().unwrap());
    assert_eq!(fw.writes(), writes, "{name}: a second cleanup wrote");
}

#[test]
fn nftables_reconciles_and_matches_its_golden_file() {
    in_netns("nftables_reconciles_and_matches_its_golden_file", || {
        reconciles_like_the_datapath(&Nft)
    });
}

#[test]
fn iptables_nft_reconciles_and_matches_its_golden_file() {
    in_netns(
        "iptables_nft_reconciles_and_matches_its_golden_file",
        || reconciles_like_the_datapath(&Ipt(IptablesMode::Nft)),
    );
}

#[test]
fn iptables_legacy_reconciles_and_matches_its_golden_file() {
    in_netns(
        "iptables_legacy_reconciles_and_matches_its_golden_file",
        || reconciles_like_the_datapath(&Ipt(IptablesMode::Legacy)),
    );
}

/// A directory holding only a link to `nft`, as the PATH of a host without iptables.
fn nft_only_path() -> (tempfile::TempDir, OsString) {
    let dir = tempfile::tempdir().unwrap();
    let nft = firewall::find_program("nft", &search_path()).expect("nft installed");
    std::os::unix::fs::symlink(nft, dir.path().join("nft")).unwrap();
    let path = OsString::from(dir.path());
    (dir, path)
}

#[test]
fn auto_follows_what_the_host_uses() {
    in_netns("auto_follows_what_the_host_uses", || {
        let path = search_path();
        let pick = |path: &OsString| choose(&HostFacts::gather(path)).unwrap();
        // This machine has every tool and a fresh namespace no rules.
        let (kind, why) = pick(&path);
        assert_eq!(kind, FirewallKind::IptablesNft, "{why}");
        assert!(why.contains("no legacy rules"), "{why}");
        // Docker on iptables-nft.
        sh("iptables-nft", "-N DOCKER-USER");
        sh("iptables-nft", "-A FORWARD -j DOCKER-USER");
        let (kind, why) = pick(&path);
        assert_eq!(kind, FirewallKind::IptablesNft);
        assert!(why.contains("Docker's among them"), "{why}");
        // Rules in legacy win.
        sh("iptables-legacy", "-t nat -N DOCKER");
        let (kind, why) = pick(&path);
        assert_eq!(kind, FirewallKind::IptablesLegacy, "{why}");
        // Only nft installed.
        let (_dir, nft_only) = nft_only_path();
        assert_eq!(pick(&nft_only).0, FirewallKind::Nftables);
        let chosen = firewall::select(FirewallKind::Auto, &nft_only).unwrap();
        assert_eq!(chosen.firewall.name(), "nftables");
        assert!(
            firewall::select(FirewallKind::IptablesNft, &nft_only).is_err(),
            "iptables-nft without its tools"
        );
    });
}

#[test]
fn nftables_needs_nothing_but_nft() {
    in_netns("nftables_needs_nothing_but_nft", || {
        let (_dir, nft_only) = nft_only_path();
        let fw = firewall::select(FirewallKind::Nftables, &nft_only)
            .unwrap()
            .firewall;
        assert!(fw.ensure(&rules(true)).unwrap());
        assert_golden("nftables-ipv4.txt", &Nft.ours());
        assert!(!fw.ensure(&rules(true)).unwrap());
    });
}

#[test]
fn cleanup_with_auto_removes_every_implementations_rules() {
    in_netns(
        "cleanup_with_auto_removes_every_implementations_rules",
        || {
            let path = search_path();
            Nft.add_theirs();
            let other = || sh("nft", "list table inet other");
            let theirs = other();
            for kind in [
                FirewallKind::Nftables,
                FirewallKind::IptablesNft,
                FirewallKind::IptablesLegacy,
            ] {
                let fw = firewall::select(kind, &path).unwrap().firewall;
                assert!(fw.ensure(&rules(true)).unwrap());
            }
            let done = firewall::cleanup(FirewallKind::Auto, &path);
            let removed: Vec<&str> = done
                .iter()
                .map(|(name, r)| {
                    assert!(matches!(r, Ok(true)), "{name}: {r:?}");
                    name.as_str()
                })
                .collect();
            assert_eq!(removed, ["nftables", "iptables-nft", "iptables-legacy"]);
            assert_eq!(Nft.ours(), "");
            assert_eq!(Ipt(IptablesMode::Nft).ours(), "");
            assert_eq!(Ipt(IptablesMode::Legacy).ours(), "");
            assert_eq!(other(), theirs, "another nft table changed");
            let again = firewall::cleanup(FirewallKind::Auto, &path);
            assert!(
                again.iter().all(|(_, r)| matches!(r, Ok(false))),
                "{again:?}"
            );
        },
    );
}

/// `overlay-agent --cleanup` needs no controller, removes the rules and exits.
#[test]
fn the_agents_cleanup_flag_removes_the_rules_and_exits() {
    in_netns(
        "the_agents_cleanup_flag_removes_the_rules_and_exits",
        || {
            let path = search_path();
            Nft.add_theirs();
            let theirs = Nft.theirs();
            for kind in [FirewallKind::Nftables, FirewallKind::IptablesNft] {
                let fw = firewall::select(kind, &path).unwrap().firewall;
                assert!(fw.ensure(&rules(true)).unwrap());
            }
            let out = Command::new(env!("CARGO_BIN_EXE_overlay-agent"))
                .arg("--cleanup")
                .env_remove("OVERLAY_FIREWALL")
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{log}");
            assert!(log.contains("removed Overlay's rules"), "{log}");
            assert_eq!(Nft.ours(), "");
            assert_eq!(Ipt(IptablesMode::Nft).ours(), "");
            assert!(Nft.theirs().contains(&theirs), "{}", Nft.theirs());
        },
    );
}
