//! CNI conformance tests of the `overlay-cni` binary, driven as a runtime drives it: the
//! CNI_* environment variables, the network config on stdin, the result or the spec's
//! error JSON on stdout.
//!
//! Kernel tests need root. Each builds its own world from named network namespaces
//! `ovlt-<pid>-<n>-<role>`: a "host" namespace holding the agent's part (bridge `ovl0`
//! with 10.244.7.1/24, as the agent makes it, and `subnet.env` in a temp dir), and one
//! namespace per "container". The plugin runs inside the host namespace
//! (`ip netns exec <host> overlay-cni`), exactly where a runtime would run it, so the
//! root namespace is never touched; the namespaces are deleted on drop.
//!
//! Tests of the error paths that fail before any kernel work run without root.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

const PLUGIN: &str = env!("CARGO_BIN_EXE_overlay-cni");
const PORTMAP: &str = "/usr/lib/cni/portmap";
const BRIDGE: &str = "ovl0";
const GATEWAY: &str = "10.244.7.1";
const SUBNET_ENV: &str =
    "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=false\n";

// ---- fixtures ----

/// A named network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ovlt-{}-{n}-{role}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `program args` inside the namespace; returns stdout, panics on failure.
    fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `program args` inside the namespace; returns whether it succeeded.
    fn try_exec(&self, program: &str, args: &[&str]) -> bool {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        Command::new("ip")
            .args(&all)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn ip(&self, args: &str) -> String {
        self.exec("ip", &args.split_whitespace().collect::<Vec<_>>())
    }

    /// `ip -j link show NAME`, or `None` when the link does not exist.
    fn link(&self, name: &str) -> Option<Value> {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "ip", "-j", "link", "show", name,
            ])
            .output()
            .expect("run ip");
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        v.as_array().and_then(|a| a.first().cloned())
    }

    /// The `local/prefixlen` IPv4 addresses of a link.
    fn ipv4_addresses(&self, link: &str) -> Vec<String> {
        let v: Value =
            serde_json::from_str(&self.ip(&format!("-j -4 addr show dev {link}"))).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect()
    }

    /// Runs `f` on a thread that has entered this namespace (only that thread does).
    fn on_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = std::fs::File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns only reads the open descriptor; CLONE_NEWNET moves just
            // this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The agent's side of one host: a namespace with the bridge, and `subnet.env`.
struct Host {
    ns: Netns,
    dir: tempfile::TempDir,
}

impl Host {
    /// `None` (after reporting the skip) when not root.
    fn new(test: &str) -> Option<Host> {
        if !overlay_tests::is_root() {
            overlay_tests::skip(test, "needs root to create network namespaces");
            return None;
        }
        let ns = Netns::new("host");
        ns.ip(&format!("link add {BRIDGE} type bridge"));
        // An explicit MAC, as the agent sets it, so the kernel never changes it.
        ns.ip(&format!("link set {BRIDGE} address 0a:58:0a:f4:07:01"));
        ns.ip(&format!("addr add {GATEWAY}/24 dev {BRIDGE}"));
        ns.ip(&format!("link set {BRIDGE} up"));
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("subnet.env"), SUBNET_ENV).unwrap();
        Some(Host { ns, dir })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn conf(&self, version: &str) -> Value {
        net_conf(version, self.dir.path())
    }

    /// Runs the plugin inside the host namespace.
    fn cni(&self, command: &str, container: &str, netns: &str, conf: &Value) -> CniOutput {
        let invocation = Invocation {
            command,
            container_id: Some(container),
            ifname: Some("eth0"),
            netns: Some(netns),
        };
        invoke(Some(&self.ns.name), PLUGIN, &invocation, &conf.to_string())
    }

    /// ADD of `container`'s namespace as `container_id`; the result, asserted a success.
    fn add(&self, container_id: &str, container: &Netns, conf: &Value) -> Value {
        self.cni("ADD", container_id, &container.path(), conf)
            .success()
    }

    /// The reserved addresses, from the IPAM directory.
    fn reserved(&self) -> Vec<String> {
        let dir = self.data_dir().join("overlay");
        let mut ips: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        ips.sort();
        ips
    }
}

fn net_conf(version: &str, dir: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "overlay",
        "type": "overlay-cni",
        "subnetFile": dir.join("subnet.env"),
        "dataDir": dir.join("data"),
        "bridge": BRIDGE,
    })
}

fn with_prev_result(conf: &Value, result: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = result.clone();
    c
}

struct Invocation<'a> {
    command: &'a str,
    container_id: Option<&'a str>,
    ifname: Option<&'a str>,
    netns: Option<&'a str>,
}

#[derive(Debug)]
struct CniOutput {
    exit_ok: bool,
    stdout: String,
}

impl CniOutput {
    /// The parsed result of a successful ADD.
    fn success(&self) -> Value {
        assert!(self.exit_ok, "expected success, got {}", self.stdout);
        serde_json::from_str(&self.stdout).expect("the result is JSON")
    }

    /// Asserts success with nothing printed (DEL, CHECK, GC, STATUS).
    fn silent_success(&self) {
        assert!(self.exit_ok, "expected success, got {}", self.stdout);
        assert_eq!(self.stdout.trim(), "", "nothing is printed on success");
    }

    /// Asserts a spec error; returns its code.
    fn error_code(&self) -> u64 {
        assert!(
            !self.exit_ok,
            "expected an error, got success: {}",
            self.stdout
        );
        let v: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("the error is not JSON ({e}): {}", self.stdout));
        for key in ["cniVersion", "msg"] {
            assert!(v[key].is_string(), "error without {key}: {v}");
        }
        v["code"].as_u64().expect("error code")
    }
}

/// Runs a CNI plugin, inside namespace `netns_name` when given, with exactly the CNI_*
/// variables of `invocation`.
fn invoke(netns_name: Option<&str>, plugin: &str, inv: &Invocation, stdin: &str) -> CniOutput {
    let mut cmd = match netns_name {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, plugin]);
            c
        }
        None => Command::new(plugin),
    };
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_IFNAME",
        "CNI_NETNS",
        "CNI_ARGS",
        "CNI_PATH",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CNI_COMMAND", inv.command)
        .env("CNI_PATH", "/usr/lib/cni")
        // The reference plugins run iptables by name.
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    if let Some(id) = inv.container_id {
        cmd.env("CNI_CONTAINERID", id);
    }
    if let Some(ifname) = inv.ifname {
        cmd.env("CNI_IFNAME", ifname);
    }
    if let Some(netns) = inv.netns {
        cmd.env("CNI_NETNS", netns);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {plugin}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait for the plugin");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        eprintln!("{plugin} {}: stderr: {stderr}", inv.command);
    }
    CniOutput {
        exit_ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
    }
}

/// [`invoke`] (outside any namespace) that gives up after `limit`: a plugin that hangs
/// is killed and reported, instead of hanging the test.
fn invoke_bounded(inv: &Invocation, stdin: &str, limit: Duration) -> CniOutput {
    let mut cmd = Command::new(PLUGIN);
    for var in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS"] {
        cmd.env_remove(var);
    }
    cmd.env("CNI_COMMAND", inv.command)
        .env("CNI_PATH", "/usr/lib/cni");
    for (var, value) in [
        ("CNI_CONTAINERID", inv.container_id),
        ("CNI_IFNAME", inv.ifname),
        ("CNI_NETNS", inv.netns),
    ] {
        if let Some(v) = value {
            cmd.env(var, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let status = overlay_tests::wait_until(limit, || child.try_wait().ok().flatten());
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{} with CNI_NETNS={:?} still runs after {limit:?}: it hangs",
            inv.command, inv.netns
        );
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    CniOutput {
        exit_ok: status.success(),
        stdout,
    }
}

fn host_veth_of(result: &Value) -> String {
    let host_side = &result["interfaces"][0];
    assert!(host_side.get("sandbox").is_none(), "{result}");
    host_side["name"].as_str().unwrap().to_string()
}

fn address_of(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap().to_string()
}

// ---- tests without the kernel ----

#[test]
fn version_reports_1_0_and_1_1() {
    let inv = Invocation {
        command: "VERSION",
        container_id: None,
        ifname: None,
        netns: None,
    };
    for stdin in [r#"{"cniVersion":"1.0.0"}"#, ""] {
        let out = invoke(None, PLUGIN, &inv, stdin);
        let v = out.success();
        assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]), "{v}");
        assert!(v["cniVersion"].is_string());
    }
}

#[test]
fn bad_config_and_environment_get_spec_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("subnet.env"), SUBNET_ENV).unwrap();
    let conf = net_conf("1.0.0", dir.path());
    let add = |stdin: &str, netns: &str| {
        let inv = Invocation {
            command: "ADD",
            container_id: Some("c1"),
            ifname: Some("eth0"),
            netns: Some(netns),
        };
        invoke(None, PLUGIN, &inv, stdin)
    };
    let missing_ns = "/run/netns/ovlt-does-not-exist";

    assert_eq!(add("{not json", missing_ns).error_code(), 6);
    let mut bad_mtu = conf.clone();
    bad_mtu["mtu"] = json!("big");
    assert_eq!(add(&bad_mtu.to_string(), missing_ns).error_code(), 7);
    let mut no_name = conf.clone();
    no_name.as_object_mut().unwrap().remove("name");
    assert_eq!(add(&no_name.to_string(), missing_ns).error_code(), 7);
    let mut ipam = conf.clone();
    ipam["ipam"] = json!({"type": "host-local"});
    assert_eq!(add(&ipam.to_string(), missing_ns).error_code(), 2);

    let old = net_conf("0.4.0", dir.path());
    let out = add(&old.to_string(), missing_ns);
    assert_eq!(out.error_code(), 1, "unsupported cniVersion");

    let out = add(&conf.to_string(), missing_ns);
    assert_eq!(out.error_code(), 3, "missing netns: {}", out.stdout);
    assert!(out.stdout.contains(missing_ns), "{}", out.stdout);
    let not_a_netns = dir.path().join("subnet.env");
    let out = add(&conf.to_string(), not_a_netns.to_str().unwrap());
    assert_eq!(
        out.error_code(),
        4,
        "a file that is no netns: {}",
        out.stdout
    );

    let no_id = Invocation {
        command: "ADD",
        container_id: None,
        ifname: Some("eth0"),
        netns: Some(missing_ns),
    };
    assert_eq!(
        invoke(None, PLUGIN, &no_id, &conf.to_string()).error_code(),
        4
    );
    let bad_ifname = Invocation {
        command: "DEL",
        container_id: Some("c1"),
        ifname: Some("eth0/x"),
        netns: None,
    };
    assert_eq!(
        invoke(None, PLUGIN, &bad_ifname, &conf.to_string()).error_code(),
        4
    );
    // ADD before the agent wrote subnet.env: "try again later".
    std::fs::remove_file(dir.path().join("subnet.env")).unwrap();
    assert_eq!(add(&conf.to_string(), missing_ns).error_code(), 11);
}

/// A CNI_NETNS naming a FIFO hung the plugin in open(2); a file, a directory or another
/// kind of namespace was only noticed by the kernel. Each is refused at once, before any
/// kernel work, with code 4 (a CNI_* variable that is not usable) naming CNI_NETNS.
#[test]
fn cni_netns_that_is_no_network_namespace_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("subnet.env"), SUBNET_ENV).unwrap();
    let conf = net_conf("1.0.0", dir.path()).to_string();
    let fifo = dir.path().join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let file = dir.path().join("subnet.env");
    for (netns, what) in [
        (fifo.to_str().unwrap(), "a FIFO"),
        (file.to_str().unwrap(), "a plain file"),
        (dir.path().to_str().unwrap(), "a directory"),
        ("/proc/self/ns/uts", "another kind"),
    ] {
        for command in ["ADD", "CHECK"] {
            let inv = Invocation {
                command,
                container_id: Some("c1"),
                ifname: Some("eth0"),
                netns: Some(netns),
            };
            let mut stdin = serde_json::from_str::<Value>(&conf).unwrap();
            if command == "CHECK" {
                stdin["prevResult"] = json!({
                    "cniVersion": "1.0.0",
                    "interfaces": [{"name": "eth0", "sandbox": netns}],
                    "ips": [{"address": "10.244.7.2/24", "gateway": GATEWAY, "interface": 0}],
                });
            }
            let out = invoke_bounded(&inv, &stdin.to_string(), Duration::from_secs(20));
            assert_eq!(out.error_code(), 4, "{command} {what}: {}", out.stdout);
            let v: Value = serde_json::from_str(&out.stdout).unwrap();
            let msg = v["msg"].as_str().unwrap();
            assert!(
                msg.contains("CNI_NETNS") && msg.contains(netns) && msg.contains(what),
                "{command} {what}: {msg}"
            );
        }
    }
    assert!(!dir.path().join("data").exists(), "no address was reserved");
}

// ---- kernel tests ----

/// CNI_NETNS naming the plugin's own namespace (the host's, for a runtime) plumbed the
/// "container" there: eth0 and an address on the host, and the host's default route
/// replaced. The plugin runs inside a namespace this test made, which plays the host.
#[test]
fn cni_netns_naming_the_plugins_own_namespace_changes_nothing() {
    let Some(host) = Host::new("cni_netns_naming_the_plugins_own_namespace_changes_nothing") else {
        return;
    };
    // The "host" gets an uplink and a default route of its own.
    host.ns.ip("link add ul0 type veth peer name ul1");
    host.ns.ip("link set ul1 up");
    host.ns.ip("addr add 192.0.2.10/24 dev ul0");
    host.ns.ip("link set ul0 up");
    host.ns.ip("route add default via 192.0.2.1 dev ul0");
    // Without the carrier flag: the bridge loses its carrier when its last port goes.
    let routes = || host.ns.ip("-4 route show").replace(" linkdown", "");
    let links = || {
        let mut l: Vec<String> = host
            .ns
            .ip("-o link show")
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_string())
            .collect();
        l.sort();
        l
    };
    let addresses = || host.ns.ip("-4 -o addr show");
    let before = (routes(), links(), addresses());
    assert!(
        before.0.contains("default via 192.0.2.1 dev ul0"),
        "{}",
        before.0
    );

    let conf = host.conf("1.0.0");
    let own = host.ns.path();
    for netns in [
        own.as_str(),
        "/proc/self/ns/net",
        "/proc/thread-self/ns/net",
    ] {
        let out = host.cni("ADD", "c1", netns, &conf);
        assert_eq!(out.error_code(), 4, "{netns}: {}", out.stdout);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.contains("CNI_NETNS") && msg.contains("own network namespace"),
            "{msg}"
        );
        let check = with_prev_result(
            &conf,
            &json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": netns}],
                "ips": [{"address": "10.244.7.2/24", "gateway": GATEWAY, "interface": 0}],
            }),
        );
        assert_eq!(host.cni("CHECK", "c1", netns, &check).error_code(), 4);
    }
    assert_eq!((routes(), links(), addresses()), before, "the host changed");
    assert!(host.reserved().is_empty(), "{:?}", host.reserved());

    // A real container next to it still works, and DEL with the host's namespace (which
    // DEL never uses) removes only what the ADD made.
    let container = Netns::new("c");
    host.add("c2", &container, &conf);
    host.cni("DEL", "c2", &own, &conf).silent_success();
    assert!(container.link("eth0").is_none());
    assert_eq!((routes(), links(), addresses()), before, "the host changed");
}

#[test]
fn add_check_del_attach_a_container_to_the_bridge() {
    let Some(host) = Host::new("add_check_del_attach_a_container_to_the_bridge") else {
        return;
    };
    let container = Netns::new("c");
    let conf = host.conf("1.0.0");

    let result = host.add("c1", &container, &conf);
    assert_eq!(result["cniVersion"], "1.0.0");
    let host_veth = host_veth_of(&result);
    assert!(
        host_veth.starts_with("ovl") && host_veth.len() == 11,
        "{host_veth}"
    );
    let iface = &result["interfaces"][1];
    assert_eq!(iface["name"], "eth0");
    assert_eq!(iface["sandbox"], container.path());
    assert!(iface.get("mtu").is_none(), "mtu is a 1.1 field");
    assert_eq!(
        result["ips"],
        json!([{"address": "10.244.7.2/24", "gateway": GATEWAY, "interface": 1}])
    );
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": GATEWAY}])
    );
    assert_eq!(result["dns"], json!({}));

    // The kernel agrees with the result.
    let eth0 = container.link("eth0").expect("eth0 in the container");
    assert_eq!(eth0["address"], iface["mac"]);
    assert_eq!(eth0["mtu"], 1450);
    assert!(eth0["flags"].as_array().unwrap().contains(&json!("UP")));
    assert_eq!(container.ipv4_addresses("eth0"), vec!["10.244.7.2/24"]);
    let routes = container.ip("route show default");
    assert!(
        routes.contains(&format!("default via {GATEWAY} dev eth0")),
        "{routes}"
    );
    let veth = host.ns.link(&host_veth).expect("host end of the veth");
    assert_eq!(veth["master"], BRIDGE);
    let details: Value =
        serde_json::from_str(&host.ns.ip(&format!("-d -j link show {host_veth}"))).unwrap();
    assert_eq!(
        details[0]["linkinfo"]["info_slave_data"]["hairpin"], true,
        "hairpin mode is on by default"
    );
    assert_eq!(veth["address"], result["interfaces"][0]["mac"]);
    assert_eq!(veth["mtu"], 1450);
    assert!(
        container.try_exec("ping", &["-c", "1", "-W", "5", GATEWAY]),
        "the container cannot ping its gateway"
    );

    // CHECK against the ADD's result.
    let check_conf = with_prev_result(&conf, &result);
    host.cni("CHECK", "c1", &container.path(), &check_conf)
        .silent_success();
    // ... and CHECK notices what a result promises but the kernel lost.
    container.ip("route del default");
    let out = host.cni("CHECK", "c1", &container.path(), &check_conf);
    assert!(out.error_code() >= 100, "{}", out.stdout);
    assert!(out.stdout.contains("0.0.0.0/0"), "{}", out.stdout);

    // DEL removes both ends and the reservation; a second DEL is fine.
    host.cni("DEL", "c1", &container.path(), &check_conf)
        .silent_success();
    assert!(host.ns.link(&host_veth).is_none(), "host veth left behind");
    assert!(
        container.link("eth0").is_none(),
        "eth0 left in the container"
    );
    assert!(host.reserved().is_empty(), "{:?}", host.reserved());
    host.cni("DEL", "c1", &container.path(), &check_conf)
        .silent_success();
}

#[test]
fn del_without_netns_or_after_the_container_is_gone() {
    let Some(host) = Host::new("del_without_netns_or_after_the_container_is_gone") else {
        return;
    };
    let mut conf = host.conf("1.0.0");
    conf["mtu"] = json!(1400);

    // containerd: CNI_NETNS is empty on DEL.
    let container = Netns::new("c");
    let result = host.add("c1", &container, &conf);
    assert_eq!(container.link("eth0").unwrap()["mtu"], 1400, "mtu override");
    let host_veth = host_veth_of(&result);
    host.cni("DEL", "c1", "", &conf).silent_success();
    assert!(host.ns.link(&host_veth).is_none());
    assert!(container.link("eth0").is_none());
    assert!(host.reserved().is_empty());

    // The namespace was deleted before DEL (the kernel took the veth with it).
    let doomed = Netns::new("gone");
    let result = host.add("c2", &doomed, &conf);
    let path = doomed.path();
    drop(doomed);
    assert_eq!(host.reserved().len(), 1);
    host.cni("DEL", "c2", &path, &with_prev_result(&conf, &result))
        .silent_success();
    assert!(host.ns.link(&host_veth_of(&result)).is_none());
    assert!(host.reserved().is_empty());
}

#[test]
fn addresses_are_never_handed_out_twice() {
    let Some(host) = Host::new("addresses_are_never_handed_out_twice") else {
        return;
    };
    let conf = host.conf("1.0.0");
    let (c1, c2) = (Netns::new("c1"), Netns::new("c2"));
    let a1 = address_of(&host.add("c1", &c1, &conf));
    let a2 = address_of(&host.add("c2", &c2, &conf));
    assert_ne!(a1, a2);
    assert_eq!(c2.ipv4_addresses("eth0"), vec![a2.clone()]);

    // A repeated ADD of the same attachment gets the same address.
    assert_eq!(address_of(&host.add("c2", &c2, &conf)), a2);
    assert_eq!(c2.ipv4_addresses("eth0"), vec![a2.clone()]);

    // DEL c1, then ADD in a new plugin process on the same dataDir (every invocation is
    // one): neither the held address nor the one released a moment ago.
    host.cni("DEL", "c1", &c1.path(), &conf).silent_success();
    let c3 = Netns::new("c3");
    let a3 = address_of(&host.add("c3", &c3, &conf));
    assert_ne!(a3, a2, "an address still held was handed out again");
    assert_ne!(a3, a1, "the address released just now was reused at once");

    // Concurrent ADDs (separate processes racing for the lock) never collide.
    let racers: Vec<Netns> = (0..4).map(|i| Netns::new(&format!("r{i}"))).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = racers
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (host, conf) = (&host, &conf);
                s.spawn(move || host.add(&format!("race{i}"), ns, conf))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<String> = results.iter().map(address_of).collect();
    all.extend([a2, a3]);
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "duplicate addresses: {all:?}");
    for a in &all {
        let ip: Ipv4Addr = a.split('/').next().unwrap().parse().unwrap();
        assert!(
            ip.octets()[3] > 1 && ip.octets()[3] < 255,
            "{a} is the network, gateway or broadcast address"
        );
    }
    assert_eq!(host.reserved().len(), all.len());
}

#[test]
fn gc_and_status_for_1_1() {
    let Some(host) = Host::new("gc_and_status_for_1_1") else {
        return;
    };
    let conf = host.conf("1.1.0");
    host.cni("STATUS", "", "", &conf).silent_success();
    let mut no_bridge = conf.clone();
    no_bridge["bridge"] = json!("nobr0");
    assert_eq!(host.cni("STATUS", "", "", &no_bridge).error_code(), 50);
    let mut no_subnet = conf.clone();
    no_subnet["subnetFile"] = json!(host.dir.path().join("missing.env"));
    assert_eq!(host.cni("STATUS", "", "", &no_subnet).error_code(), 50);
    assert_eq!(
        host.cni("STATUS", "", "", &host.conf("1.0.0")).error_code(),
        1,
        "STATUS is a 1.1 command"
    );

    let (keep, stale) = (Netns::new("keep"), Netns::new("stale"));
    let kept = host.add("keep", &keep, &conf);
    assert_eq!(kept["cniVersion"], "1.1.0");
    assert_eq!(
        kept["interfaces"][1]["mtu"], 1450,
        "1.1 results carry the MTU"
    );
    let gone = host.add("stale", &stale, &conf);
    assert_eq!(host.reserved().len(), 2);

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    host.cni("GC", "", "", &gc).silent_success();
    let held_ip = address_of(&kept);
    assert_eq!(
        host.reserved(),
        vec![held_ip.split('/').next().unwrap().to_string()]
    );
    assert!(
        host.ns.link(&host_veth_of(&gone)).is_none(),
        "stale veth kept"
    );
    assert!(
        host.ns.link(&host_veth_of(&kept)).is_some(),
        "valid veth removed"
    );
    host.cni(
        "CHECK",
        "keep",
        &keep.path(),
        &with_prev_result(&conf, &kept),
    )
    .silent_success();
}

#[test]
fn a_port_published_through_portmap_is_reachable() {
    let test = "a_port_published_through_portmap_is_reachable";
    let Some(host) = Host::new(test) else {
        return;
    };
    if !Path::new(PORTMAP).exists() {
        overlay_tests::skip(
            test,
            "needs /usr/lib/cni/portmap (scripts/install-deps.sh installs containernetworking-plugins)",
        );
        return;
    }
    let container = Netns::new("web");
    // Debian's reference plugins (1.1.x) speak up to 1.0.0: the conflist's version.
    let conf = host.conf("1.0.0");
    let result = host.add("web1", &container, &conf);
    let portmap_conf = json!({
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
        ]},
        "prevResult": result,
    });
    let portmap = |command| {
        let inv = Invocation {
            command,
            container_id: Some("web1"),
            ifname: Some("eth0"),
            netns: Some(&container.path()),
        };
        invoke(
            Some(&host.ns.name),
            PORTMAP,
            &inv,
            &portmap_conf.to_string(),
        )
    };
    let chained = portmap("ADD").success();
    assert_eq!(
        chained["ips"], result["ips"],
        "portmap passes the result on"
    );

    // A listener in the container on port 80, a client in the host namespace on 8080.
    let listener = container.on_thread(|| TcpListener::bind("0.0.0.0:80").expect("bind :80"));
    let listener = listener.join().unwrap();
    let server = std::thread::spawn(move || {
        let mut received = Vec::new();
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            conn.read_to_end(&mut got).expect("read");
            received.push(String::from_utf8(got).unwrap());
        }
        received
    });
    let send = |message: &'static str| {
        move || {
            let to: SocketAddr = format!("{GATEWAY}:8080").parse().unwrap();
            // A bound for a broken datapath, not a timing assertion.
            let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{message}: connect to the published port: {e}"));
            conn.write_all(message.as_bytes()).expect("write");
        }
    };
    host.ns
        .on_thread(send("from the host"))
        .join()
        .expect("host client");
    // Hairpin: the container reaches its own published port through the host's address
    // (routed by the host, so forwarding must be on there, as the agent has it).
    host.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    container
        .on_thread(send("from the container itself"))
        .join()
        .expect("container client");
    assert_eq!(
        server.join().unwrap(),
        vec!["from the host", "from the container itself"]
    );

    // DEL in reverse order removes the mapping and the attachment.
    portmap("DEL").silent_success();
    host.cni(
        "DEL",
        "web1",
        &container.path(),
        &with_prev_result(&conf, &result),
    )
    .silent_success();
    let nat = host.ns.exec("iptables-save", &["-t", "nat"]);
    assert!(!nat.contains("8080"), "the port mapping is left: {nat}");
    assert!(host.reserved().is_empty());
}
