//! Scenario 6, the bad input catalogue: config values and files, `overlayctl` flags,
//! overlay-cni environments and network configs, and raw gRPC requests, each of which
//! must be refused with an error naming what is wrong, while the store (down to
//! modification revisions) and the CNI plugin's files and links stay as they were. The
//! catalogue is a table, one row per input, so that a new input is one line.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use overlay_lab::netns;
use overlay_proto::v1::{self, admin_client::AdminClient, agent_client::AgentClient};
use overlay_tests::cluster::Controller;
use overlay_tests::{bin_path, is_root, Etcd};
use tonic::transport::Channel;
use tonic::Status;

use crate::control_plane::{etcd_client, grpc_channel, runtime, set_config, EtcdView};
use crate::report::Summary;

/// How a bad input was answered.
#[derive(Debug)]
enum Answer {
    /// Accepted: the input was not refused.
    Accepted(String),
    /// Refused with this text: exit status and stderr (overlayctl), exit status and the
    /// error JSON (overlay-cni), code and message (gRPC).
    Refused(String),
}

/// One row of the catalogue: what was sent, and what its error must name (words the
/// answer must contain, case-insensitive: the exit status or code, the field, the value).
struct Case {
    area: &'static str,
    name: &'static str,
    names: &'static [&'static str],
    answer: Answer,
}

fn case(name: &'static str, names: &'static [&'static str], answer: Answer) -> Case {
    Case {
        area: "",
        name,
        names,
        answer,
    }
}

impl Case {
    /// Why the answer is not a clear refusal, if it is not.
    fn problem(&self) -> Option<String> {
        match &self.answer {
            Answer::Accepted(out) => Some(format!("accepted: {out}")),
            Answer::Refused(text) => {
                let lower = text.to_lowercase();
                let missing: Vec<&&str> = self
                    .names
                    .iter()
                    .filter(|w| !lower.contains(&w.to_lowercase()))
                    .collect();
                (!missing.is_empty()).then(|| format!("does not name {missing:?}: {text}"))
            }
        }
    }
}

/// What the catalogue runs against: a controller with a lease and a reservation, raw
/// gRPC clients, and files for overlay-cni (which runs in a namespace of its own when
/// we are root, so that nothing it could do reaches the machine's own network).
struct Bench<'a> {
    url: String,
    rt: &'a tokio::runtime::Runtime,
    agent: AgentClient<Channel>,
    admin: AdminClient<Channel>,
    /// The subnet leased to node "holder".
    held: String,
    cni_ns: Option<String>,
    dir: std::path::PathBuf,
}

impl Bench<'_> {
    fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> Answer {
        let mut cmd = Command::new(bin_path("overlayctl"));
        cmd.arg("--insecure")
            .arg(format!("--controller={}", self.url))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("overlayctl");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() {
            Answer::Accepted(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Answer::Refused(format!(
                "exit {}: {stderr}",
                out.status.code().unwrap_or(-1)
            ))
        }
    }

    /// `overlayctl config set ARGS`.
    fn set(&self, args: &[&str]) -> Answer {
        let mut all = vec!["config", "set"];
        all.extend_from_slice(args);
        self.cli(&all, None)
    }

    /// `overlayctl config set --file F` with F holding `text`.
    fn set_file(&self, name: &str, text: &str) -> Answer {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        self.set(&["--file", &path.display().to_string()])
    }

    /// `overlayctl --controller URL leases` (the URL is the bad input).
    fn cli_at(&self, url: &str) -> Answer {
        let b = Bench {
            url: url.into(),
            rt: self.rt,
            agent: self.agent.clone(),
            admin: self.admin.clone(),
            held: String::new(),
            cni_ns: None,
            dir: self.dir.clone(),
        };
        b.cli(&["leases"], None)
    }

    fn subnet_env(&self) -> std::path::PathBuf {
        self.dir.join("subnet.env")
    }

    fn ipam_dir(&self) -> std::path::PathBuf {
        self.dir.join("ipam")
    }

    /// A valid network config for overlay-cni with `changes` applied (null removes).
    fn netconf(&self, changes: serde_json::Value) -> Vec<u8> {
        let mut v = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "overlay",
            "type": "overlay-cni",
            "subnetFile": self.subnet_env(),
            "dataDir": self.ipam_dir(),
            "bridge": "ovl0",
        });
        for (k, x) in changes.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        serde_json::to_vec(&v).unwrap()
    }

    /// overlay-cni ADD of a container whose namespace does not exist, with `env`
    /// overriding the CNI_* variables ("" removes one).
    fn cni(&self, env: &[(&str, &str)], stdin: &[u8]) -> Answer {
        let mut vars: BTreeMap<&str, &str> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "faults-1"),
            ("CNI_NETNS", "/run/netns/ovlt-faults-missing"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .into_iter()
        .collect();
        for (k, v) in env {
            if v.is_empty() {
                vars.remove(k);
            } else {
                vars.insert(k, v);
            }
        }
        let mut cmd = Command::new(bin_path("overlay-cni"));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = &self.cni_ns {
            netns::in_netns(&mut cmd, ns).unwrap();
        }
        let mut child = cmd.spawn().expect("overlay-cni");
        let mut input = child.stdin.take().unwrap();
        let stdin = stdin.to_vec();
        // The plugin may answer before reading everything.
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Answer::Accepted(stdout)
        } else {
            Answer::Refused(format!(
                "exit {}: {stdout}",
                out.status.code().unwrap_or(-1)
            ))
        }
    }

    /// What overlay-cni must leave alone: its IPAM directory and the links of the
    /// namespace it ran in.
    fn cni_state(&self) -> (Vec<String>, String) {
        let mut files = walk(&self.ipam_dir());
        files.sort();
        let links = match &self.cni_ns {
            Some(ns) => netns::ip_in(ns, &["-o", "link", "show"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default(),
            None => String::new(),
        };
        (files, links)
    }

    fn grpc<T: std::fmt::Debug>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Answer {
        match self.rt.block_on(call) {
            Ok(r) => Answer::Accepted(format!("{:?}", r.into_inner())),
            Err(s) => Answer::Refused(format!("{:?}: {}", s.code(), s.message())),
        }
    }

    /// AcquireLease of a valid newcomer with `change` applied.
    fn acquire(&self, change: impl FnOnce(&mut v1::AcquireLeaseRequest)) -> Answer {
        let mut req = v1::AcquireLeaseRequest {
            node: "newcomer".into(),
            public_ip: "198.51.100.30".into(),
            backend: v1::BackendType::Alloc as i32,
            ..Default::default()
        };
        change(&mut req);
        self.grpc(self.agent.clone().acquire_lease(req))
    }

    fn renew(&self, node: &str, subnet: &str) -> Answer {
        self.grpc(self.agent.clone().renew_lease(v1::RenewLeaseRequest {
            node: node.into(),
            subnet: subnet.into(),
        }))
    }

    fn release(&self, node: &str, subnet: &str) -> Answer {
        self.grpc(self.agent.clone().release_lease(v1::ReleaseLeaseRequest {
            node: node.into(),
            subnet: subnet.into(),
        }))
    }

    fn watch(&self, after_revision: i64) -> Answer {
        self.grpc(
            self.agent
                .clone()
                .watch_leases(v1::WatchLeasesRequest { after_revision }),
        )
    }

    fn set_json(&self, json: &str) -> Answer {
        self.grpc(self.admin.clone().set_config(v1::SetConfigRequest {
            json: json.into(),
            force: false,
        }))
    }

    fn reserve(&self, subnet: &str, node: &str, public_ip: &str) -> Answer {
        self.grpc(self.admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
            subnet: subnet.into(),
            node: node.into(),
            public_ip: public_ip.into(),
            ..Default::default()

        }))
    }

    fn revoke(&self, subnet: &str) -> Answer {
        self.grpc(self.admin.clone().revoke_lease(v1::RevokeLeaseRequest {
            subnet: subnet.into(),
        }))
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if p.is_dir() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

const NET: &str = "10.96.0.0/12";

#[rustfmt::skip]
fn config_cases(b: &Bench) -> Vec<Case> {
    let set = |extra: &[&str]| {
        let mut args = vec!["--network", NET, "--backend", "alloc"];
        args.extend_from_slice(extra);
        b.set(&args)
    };
    vec![
        case("network not a CIDR", &["exit 1", "--network", "banana"], b.set(&["--network", "banana", "--backend", "alloc"])),
        case("network prefix /33", &["exit 1", "--network", "10.96.0.0/33"], b.set(&["--network", "10.96.0.0/33", "--backend", "alloc"])),
        case("network with host bits", &["exit 1", "--network", "host bits"], b.set(&["--network", "10.96.1.0/12", "--backend", "alloc"])),
        case("network smaller than /28", &["exit 1", "--network", "/28"], b.set(&["--network", "10.96.0.0/29", "--backend", "alloc"])),
        // Checked at parse time since the hardening issue: usage errors (exit 2), naming the flag.
        case("vni 0", &["exit 2", "--vni", "0"], b.set(&["--network", NET, "--vni", "0"])),
        case("vni 2^24", &["exit 2", "--vni", "16777216"], b.set(&["--network", NET, "--vni", "16777216"])),
        case("port 0", &["exit 2", "--port", "0"], b.set(&["--network", NET, "--port", "0"])),
        case("port 70000", &["exit 2", "--port", "70000"], b.set(&["--network", NET, "--port", "70000"])),
        case("mtu 100", &["exit 2", "--mtu", "100"], set(&["--mtu", "100"])),
        case("lease TTL 0s", &["exit 2", "--lease-ttl", "0s"], set(&["--lease-ttl", "0s"])),
        case("lease TTL 1.5s", &["exit 2", "--lease-ttl", "whole number of seconds"], set(&["--lease-ttl", "1.5s"])),
        case("lease TTL not a duration", &["exit 2", "--lease-ttl", "soon"], set(&["--lease-ttl", "soon"])),
        case("subnet length 31", &["exit 2", "--subnet-len", "31"], set(&["--subnet-len", "31"])),
        case("subnet length shorter than the network", &["exit 1", "--subnet-len", "8"], set(&["--subnet-len", "8"])),
        case("subnet min outside the network", &["exit 1", "--subnet-min", "192.0.2.0/24"], set(&["--subnet-min", "192.0.2.0/24"])),
        case("subnet min after subnet max", &["exit 1", "--subnet-min", "after subnet_max"], set(&["--subnet-min", "10.96.9.0/24", "--subnet-max", "10.96.2.0/24"])),
        case("unknown backend", &["exit 2", "--backend", "udp"], b.set(&["--network", NET, "--backend", "udp"])),
        case("backend change with hosts up, no --force", &["exit 1", "backend", "--force"], b.set(&["--network", NET, "--backend", "vxlan"])),
        case("network change stranding leases, no --force", &["exit 1", "--force", "holder"], b.set(&["--network", "10.250.0.0/16", "--backend", "alloc"])),
        case("file: truncated JSON", &["exit 1", "truncated.json", "line 1 column"], b.set_file("truncated.json", r#"{"network": "10.96.0.0/12", "backend": {"#)),
        // serde names the position and the expected type, not the field.
        case("file: network is a number", &["exit 1", "wrong-type.json", "expected a string", "line 1 column 14"], b.set_file("wrong-type.json", r#"{"network": 12}"#)),
        case("file: misspelt field", &["exit 1", "misspelt.json", "netwrok"], b.set_file("misspelt.json", r#"{"network": "10.96.0.0/12", "netwrok": "10.0.0.0/8"}"#)),
        case("file: empty", &["exit 1", "empty.json", "not a valid config document"], b.set_file("empty.json", "")),
        case("file: negative vni", &["exit 1", "negative-vni.json", "-1"], b.set_file("negative-vni.json", r#"{"network": "10.96.0.0/12", "backend": {"type": "vxlan", "vni": -1}}"#)),
        case("file: valid JSON, invalid value", &["exit 1", "bad-network.json", "network", "10.96.0.0/40"], b.set_file("bad-network.json", r#"{"network": "10.96.0.0/40", "backend": {"type": "alloc"}}"#)),
        case("file: missing", &["exit 1", "--file", "/nonexistent/overlay.json"], b.set(&["--file", "/nonexistent/overlay.json"])),
        // "-" is how the operator named stdin.
        case("file from stdin: not JSON", &["exit 1", "-:", "not a valid config document"], b.cli(&["config", "set", "--file", "-"], Some(b"network=10.96.0.0/12"))),
    ]
}

#[rustfmt::skip]
fn cli_cases(b: &Bench) -> Vec<Case> {
    let pki = b.dir.join("pki").display().to_string();
    assert!(matches!(b.cli(&["certs", "init", "--dir", &pki], None), Answer::Accepted(_)), "certs init");
    let reserve = |subnet: &str, node: &str, ip: &str| {
        b.cli(&["lease", "reserve", "--subnet", subnet, "--node", node, "--public-ip", ip], None)
    };
    vec![
        case("controller URL with another scheme", &["exit 2", "--controller", "ftp://"], b.cli_at("ftp://controller:7400")),
        case("controller URL without a host", &["exit 2", "--controller", "no host"], b.cli_at("http://:7400")),
        case("unknown output format", &["exit 2", "--output", "yaml"], b.cli(&["leases", "-o", "yaml"], None)),
        case("unknown command", &["exit 2", "frobnicate"], b.cli(&["frobnicate"], None)),
        case("reserve: subnet with host bits", &["exit 2", "--subnet", "host bits"], reserve("10.96.5.1/24", "n1", "198.51.100.1")),
        case("reserve: node name with a space", &["exit 2", "--node", "a b"], reserve("10.96.5.0/24", "a b", "198.51.100.1")),
        case("reserve: public IP 300.1.1.1", &["exit 2", "--public-ip", "300.1.1.1"], reserve("10.96.5.0/24", "n1", "300.1.1.1")),
        case("reserve: public IP inside the overlay", &["exit 1", "10.96.3.3", "inside the overlay"], reserve("10.96.5.0/24", "n1", "10.96.3.3")),
        case("reserve: subnet outside the network", &["exit 1", "10.250.5.0/24", "not one of the network's subnets"], reserve("10.250.5.0/24", "n1", "198.51.100.1")),
        case("reserve: a subnet leased to another node", &["exit 1", "leased to node holder"], reserve(&b.held, "thief", "198.51.100.99")),
        case("reserve: --node missing", &["exit 2", "--node"], b.cli(&["lease", "reserve", "--subnet", "10.96.5.0/24", "--public-ip", "198.51.100.1"], None)),
        // Hardening: a certificate name that would take the CA's or another name's files.
        case("certs issue --name ca", &["exit 1", "\"ca\"", "CA's own name"], b.cli(&["certs", "issue", "--dir", &pki, "--name", "ca"], None)),
        case("certs issue --name node-a-key", &["exit 1", "node-a-key", "reserved"], b.cli(&["certs", "issue", "--dir", &pki, "--name", "node-a-key"], None)),
        case("revoke: not a CIDR", &["exit 2", "SUBNET", "not-a-subnet"], b.cli(&["lease", "revoke", "not-a-subnet"], None)),
        case("revoke: no such lease", &["exit 1", "10.96.250.0/24", "no lease"], b.cli(&["lease", "revoke", "10.96.250.0/24"], None)),
        case("watch: negative revision", &["exit 2", "--after-revision", "-5"], b.cli(&["watch", "--after-revision", "-5"], None)),
        case("routes: node name with a slash", &["exit 1", "--node", "a/b"], b.cli(&["routes", "--node", "a/b"], None)),
        case("--insecure with TLS files", &["--insecure", "--tls"], b.cli(&["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem", "--tls-ca", "/nonexistent/ca.pem", "leases"], None)),
    ]
}

#[rustfmt::skip]
fn cni_cases(b: &Bench) -> Vec<Case> {
    let good = b.netconf(serde_json::json!({}));
    let conf = |changes: serde_json::Value| b.netconf(changes);
    let garbage = b.dir.join("garbage.env");
    std::fs::write(&garbage, "this is not a subnet file\n").unwrap();
    vec![
        case("no CNI_COMMAND", &[r#""code":4"#, "CNI_COMMAND"], b.cni(&[("CNI_COMMAND", "")], &good)),
        case("unknown CNI_COMMAND", &[r#""code":4"#, "CNI_COMMAND", "PUT"], b.cni(&[("CNI_COMMAND", "PUT")], &good)),
        case("ADD without CNI_CONTAINERID", &[r#""code":4"#, "CNI_CONTAINERID"], b.cni(&[("CNI_CONTAINERID", "")], &good)),
        case("ADD with CNI_CONTAINERID ../x", &[r#""code":4"#, "CNI_CONTAINERID", "../x"], b.cni(&[("CNI_CONTAINERID", "../x")], &good)),
        case("ADD without CNI_IFNAME", &[r#""code":4"#, "CNI_IFNAME"], b.cni(&[("CNI_IFNAME", "")], &good)),
        case("ADD with a 16-byte CNI_IFNAME", &[r#""code":4"#, "CNI_IFNAME", "eth0123456789abc"], b.cni(&[("CNI_IFNAME", "eth0123456789abc")], &good)),
        case("ADD without CNI_NETNS", &[r#""code":4"#, "CNI_NETNS"], b.cni(&[("CNI_NETNS", "")], &good)),
        case("ADD with a CNI_NETNS that does not exist", &[r#""code":3"#, "ovlt-faults-missing"], b.cni(&[], &good)),
        // Hardening: the plugin's own namespace (the host's, for a runtime) and a file that
        // is no namespace at all are refused before anything is touched.
        case("ADD with CNI_NETNS the plugin's own namespace", &[r#""code":4"#, "CNI_NETNS"], b.cni(&[("CNI_NETNS", "/proc/self/ns/net")], &good)),
        case("ADD with CNI_NETNS a regular file", &[r#""code":4"#, "CNI_NETNS"], b.cni(&[("CNI_NETNS", garbage.to_str().unwrap())], &good)),
        case("ADD with empty stdin", &[r#""code":6"#, "not JSON"], b.cni(&[], b"")),
        case("ADD with stdin not JSON", &[r#""code":6"#, "not JSON"], b.cni(&[], b"{cniVersion: 1.0.0")),
        case("ADD with a JSON array", &[r#""code":7"#, "JSON object"], b.cni(&[], b"[]")),
        case("ADD without cniVersion", &[r#""code":1"#, "cniVersion"], b.cni(&[], &conf(serde_json::json!({"cniVersion": null})))),
        case("ADD with cniVersion 0.3.1", &[r#""code":1"#, "0.3.1"], b.cni(&[], &conf(serde_json::json!({"cniVersion": "0.3.1"})))),
        case("ADD with an ipam section", &[r#""code":2"#, "ipam"], b.cni(&[], &conf(serde_json::json!({"ipam": {"type": "host-local"}})))),
        case("ADD with network name ../../etc", &[r#""code":7"#, "network name", "../../etc"], b.cni(&[], &conf(serde_json::json!({"name": "../../etc"})))),
        case("ADD with bridge br/0", &[r#""code":7"#, "bridge", "br/0"], b.cni(&[], &conf(serde_json::json!({"bridge": "br/0"})))),
        case("ADD with mtu 10", &[r#""code":7"#, "mtu 10"], b.cni(&[], &conf(serde_json::json!({"mtu": 10})))),
        // serde_json::from_value names the value and the type, not the field.
        case("ADD with mtu as a string", &[r#""code":7"#, "invalid network config", "1500"], b.cni(&[], &conf(serde_json::json!({"mtu": "1500"})))),
        case("ADD with prevResult not a result", &[r#""code":6"#, "prevResult"], b.cni(&[], &conf(serde_json::json!({"prevResult": {"ips": "none"}})))),
        case("ADD with a subnetFile that does not exist", &[r#""code":11"#, "/nonexistent/subnet.env"], b.cni(&[], &conf(serde_json::json!({"subnetFile": "/nonexistent/subnet.env"})))),
        case("ADD with a subnetFile of garbage", &[r#""code":5"#, "garbage.env"], b.cni(&[], &conf(serde_json::json!({"subnetFile": garbage})))),
        // A network name is a directory name under dataDir: at most 255 bytes.
        case("ADD with a 256-byte network name", &[r#""code":7"#, "network name"], b.cni(&[], &conf(serde_json::json!({"name": "x".repeat(256)})))),
        case("ADD with 2 MiB on stdin", &[r#""code":6"#, "over the limit"], b.cni(&[], &conf(serde_json::json!({"padding": "x".repeat(2 << 20)})))),
    ]
}

#[rustfmt::skip]
fn grpc_cases(b: &Bench) -> Vec<Case> {
    vec![
        case("acquire: public_ip not an address", &["InvalidArgument", "public_ip", "not-an-ip"], b.acquire(|r| r.public_ip = "not-an-ip".into())),
        case("acquire: public_ip inside the overlay", &["InvalidArgument", "10.96.3.3", "inside the overlay"], b.acquire(|r| r.public_ip = "10.96.3.3".into())),
        case("acquire: public_ip multicast", &["InvalidArgument", "public IP 224.0.0.1", "unicast"], b.acquire(|r| r.public_ip = "224.0.0.1".into())),
        case("acquire: public_ip 0.0.0.0", &["InvalidArgument", "public IP 0.0.0.0"], b.acquire(|r| r.public_ip = "0.0.0.0".into())),
        case("acquire: empty node name", &["InvalidArgument", "node name \"\""], b.acquire(|r| r.node = String::new())),
        case("acquire: node name with a slash", &["InvalidArgument", "node name", "a/b"], b.acquire(|r| r.node = "a/b".into())),
        case("acquire: 300-character node name", &["InvalidArgument", "node name", "1-253 characters"], b.acquire(|r| r.node = "n".repeat(300))),
        case("acquire: vtep_mac not a MAC", &["InvalidArgument", "vtep_mac", "zz:zz"], b.acquire(|r| r.vtep_mac = Some("zz:zz".into()))),
        case("acquire: multicast vtep_mac", &["InvalidArgument", "VTEP MAC 01:00:5e:00:00:01", "unicast"], b.acquire(|r| r.vtep_mac = Some("01:00:5e:00:00:01".into()))),
        case("acquire: backend differs from the cluster's", &["InvalidArgument", "backend vxlan", "alloc"], b.acquire(|r| r.backend = v1::BackendType::Vxlan as i32)),
        case("acquire: unknown backend number", &["InvalidArgument", "backend", "99"], b.acquire(|r| r.backend = 99)),
        case("acquire: preferred_subnet with host bits", &["InvalidArgument", "preferred_subnet", "host bits"], b.acquire(|r| r.preferred_subnet = Some("10.96.9.1/24".into()))),
        case("acquire: preferred_subnet not a CIDR", &["InvalidArgument", "preferred_subnet", "ten"], b.acquire(|r| r.preferred_subnet = Some("ten".into()))),
        case("acquire: underlay without the public IP", &["InvalidArgument", "underlay 203.0.113.0/24", "198.51.100.30"], b.acquire(|r| r.underlay = Some("203.0.113.0/24".into()))),
        case("acquire: interface name with a slash", &["InvalidArgument", "interface name", "eth/0"], b.acquire(|r| r.iface = Some("eth/0".into()))),
        // Hardening: fields that would be printed to terminals or routed to nowhere.
        case("acquire: interface name with an escape sequence", &["InvalidArgument", "interface name", "control characters"], b.acquire(|r| r.iface = Some("e\u{1b}[2J".into()))),
        case("acquire: public_ip loopback", &["InvalidArgument", "127.0.0.1", "loopback"], b.acquire(|r| r.public_ip = "127.0.0.1".into())),
        case("acquire: public_ip link-local", &["InvalidArgument", "169.254.1.1", "link-local"], b.acquire(|r| r.public_ip = "169.254.1.1".into())),
        case("acquire: 100 KiB request", &["OutOfRange", "message length too large", "65536"], b.acquire(|r| r.node = "n".repeat(100 * 1024))),
        case("renew: subnet not a CIDR", &["InvalidArgument", "subnet", "garbage"], b.renew("holder", "garbage")),
        case("renew: another node's lease", &["PermissionDenied", "thief", "held by node \"holder\""], b.renew("thief", &b.held)),
        case("renew: a subnet nobody holds", &["NotFound", "10.96.250.0/24"], b.renew("holder", "10.96.250.0/24")),
        case("release: another node's lease", &["PermissionDenied", "thief", "held by node \"holder\""], b.release("thief", &b.held)),
        case("watch: negative after_revision", &["InvalidArgument", "after_revision", "negative"], b.watch(-1)),
        case("set config: empty JSON", &["InvalidArgument", "not a valid config document"], b.set_json("")),
        case("set config: truncated JSON", &["InvalidArgument", "not a valid config document", "line 1 column 11"], b.set_json("{\"network\":")),
        case("set config: lease_ttl 0s", &["InvalidArgument", "lease_ttl", "0s"], b.set_json(r#"{"network":"10.96.0.0/12","backend":{"type":"alloc"},"lease_ttl":"0s"}"#)),
        case("set config: misspelt field", &["InvalidArgument", "netwrok"], b.set_json(r#"{"netwrok":"10.96.0.0/12"}"#)),
        case("set config: stranding leases", &["FailedPrecondition", "holder", "--force"], b.set_json(r#"{"network":"10.250.0.0/16","backend":{"type":"alloc"}}"#)),
        case("set config: VNI change with hosts up", &["FailedPrecondition", "VNI 1 -> 9", "--force"], b.set_json(r#"{"network":"10.96.0.0/12","backend":{"type":"alloc","vni":9}}"#)),
        case("reserve: subnet with host bits", &["InvalidArgument", "subnet", "host bits"], b.reserve("10.96.5.1/24", "n1", "198.51.100.1")),
        case("reserve: subnet outside the network", &["InvalidArgument", "192.0.2.0/24", "not one of the network's subnets"], b.reserve("192.0.2.0/24", "n1", "198.51.100.1")),
        case("reserve: subnet of the wrong size", &["InvalidArgument", "10.96.5.0/25", "not one of the network's subnets"], b.reserve("10.96.5.0/25", "n1", "198.51.100.1")),
        case("reserve: bad node name", &["InvalidArgument", "node name", "bad node"], b.reserve("10.96.5.0/24", "bad node", "198.51.100.1")),
        case("reserve: public IP inside the overlay", &["InvalidArgument", "10.96.3.3", "inside the overlay"], b.reserve("10.96.5.0/24", "n1", "10.96.3.3")),
        case("reserve: public IP link-local", &["InvalidArgument", "169.254.7.7", "link-local"], b.reserve("10.96.5.0/24", "n1", "169.254.7.7")),
        case("reserve: a subnet leased to another node", &["FailedPrecondition", "leased to node holder"], b.reserve(&b.held, "thief", "198.51.100.99")),
        case("reserve: a second reservation for a node", &["FailedPrecondition", "pinned", "10.96.200.0/24"], b.reserve("10.96.201.0/24", "pinned", "198.51.100.20")),
        case("revoke: not a CIDR", &["InvalidArgument", "subnet", "nope"], b.revoke("nope")),
        case("revoke: a subnet nobody holds", &["NotFound", "10.96.250.0/24"], b.revoke("10.96.250.0/24")),
    ]
}

pub fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    let test = "bad_input_is_refused_with_a_clear_error_and_changes_nothing";
    let Some(etcd) = Etcd::start_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&etcd, "/overlay", dir.path(), "controller");
    // The holder's random lease stays below 10.96.200.0/24, which is reserved below.
    set_config(
        &controller.url,
        &[
            "--network",
            NET,
            "--backend",
            "alloc",
            "--subnet-max",
            "10.96.199.0/24",
        ],
    );
    let mut summary = Summary::new("6. bad input catalogue");
    let rt = runtime();
    let channel = {
        let _g = rt.enter();
        grpc_channel(&controller.url)
    };
    let agent = AgentClient::new(channel.clone());
    let admin = AdminClient::new(channel);
    // State to protect: a node's lease and a reservation.
    let held = rt
        .block_on(agent.clone().acquire_lease(v1::AcquireLeaseRequest {
            node: "holder".into(),
            public_ip: "198.51.100.10".into(),
            backend: v1::BackendType::Alloc as i32,
            ..Default::default()
        }))
        .expect("a lease")
        .into_inner()
        .lease
        .unwrap()
        .subnet;
    rt.block_on(admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
        subnet: "10.96.200.0/24".into(),
        node: "pinned".into(),
        public_ip: "198.51.100.20".into(),
        ..Default::default()

    }))
    .expect("a reservation");
    let cni_ns = is_root().then(|| format!("ovlt-{}-cni", std::process::id()));
    if let Some(ns) = &cni_ns {
        netns::create(ns).unwrap();
    }
    let files = tempfile::tempdir().unwrap();
    let bench = Bench {
        url: controller.url.clone(),
        rt: &rt,
        agent,
        admin,
        held,
        cni_ns: cni_ns.clone(),
        dir: files.path().to_path_buf(),
    };
    std::fs::write(
        bench.subnet_env(),
        "OVERLAY_NETWORK=10.96.0.0/12\nOVERLAY_SUBNET=10.96.7.1/24\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=false\n",
    )
    .unwrap();
    std::fs::create_dir_all(bench.ipam_dir()).unwrap();
    let mut etcd_kv = rt.block_on(etcd_client(&etcd));
    let before = rt.block_on(EtcdView::read(&mut etcd_kv));
    let cni_before = bench.cni_state();

    let mut cases = Vec::new();
    for (area, rows) in [
        ("config", config_cases(&bench)),
        ("cli", cli_cases(&bench)),
        ("cni", cni_cases(&bench)),
        ("grpc", grpc_cases(&bench)),
    ] {
        cases.extend(rows.into_iter().map(|c| Case { area, ..c }));
    }

    let after = rt.block_on(EtcdView::read(&mut etcd_kv));
    let cni_after = bench.cni_state();
    if let Some(ns) = &cni_ns {
        let _ = netns::delete(ns);
    }
    let mut problems = Vec::new();
    let mut per_area: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    println!("\nbad input catalogue:");
    for c in &cases {
        let counts = per_area.entry(c.area).or_default();
        counts.0 += 1;
        match c.problem() {
            None => {
                counts.1 += 1;
                if let Answer::Refused(text) = &c.answer {
                    println!("  ok    [{}] {}: {text}", c.area, c.name);
                }
            }
            Some(p) => {
                println!("  FAIL  [{}] {}: {p}", c.area, c.name);
                problems.push(format!("[{}] {}: {p}", c.area, c.name));
            }
        }
    }
    for (area, (n, ok)) in &per_area {
        summary.row(
            &format!("{area}: refused with an error naming the problem"),
            format!("{ok} of {n}"),
        );
    }
    summary.row(
        "etcd revision before / after",
        format!("{} / {}", before.revision, after.revision),
    );
    summary.row(
        "leases and config unchanged (values and modification revisions)",
        after.written() == before.written(),
    );
    summary.row(
        "CNI IPAM files and namespace links unchanged",
        cni_after == cni_before,
    );
    summary.row("inputs accepted, or refused unclearly", problems.len());
    summary.finish();

    assert!(
        problems.is_empty(),
        "bad inputs not refused clearly:\n{}",
        problems.join("\n")
    );
    assert_eq!(
        after.written(),
        before.written(),
        "bad input changed the store"
    );
    assert_eq!(cni_after, cni_before, "bad CNI input changed the host");
}
