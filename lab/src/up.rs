//! Building a lab: [`LabSpec`] says what to build, [`Lab::up`] builds it in order, each
//! step announced to a progress callback: the underlay namespace and its bridge,
//! certificates, etcd, the controller and the cluster config, then the hosts (each with
//! its agent, see `hosts`) and their workloads (`workloads`). etcd and the controller are
//! each waited for before the next step, and every agent before the first workload, so
//! a failure names the component that did not come up and shows its log, rather than a
//! timeout further on.
//!
//! A failed `up` removes what it made but the logs (the next `up` or `lab down` removes
//! them), since they say why it failed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::wait_component;
use crate::{
    file_err, http_get_in, netns, teardown_keeping_logs, Lab, LabError, LabState, CONTROLLER_PORT,
    STATE_FILE, UNDERLAY_GATEWAY,
};

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub name: String,
    /// Prefix of every namespace the lab makes.
    pub ns_prefix: String,
    /// Logs, state, etcd data.
    pub dir: PathBuf,
    /// Where the overlay binaries are.
    pub bin_dir: PathBuf,
    pub hosts: usize,
    pub backend: String,
    pub network: String,
    /// The last subnet handed out at random (`--subnet-max`); subnets after it are left
    /// for reservations.
    pub subnet_max: Option<String>,
    pub lease_ttl: Option<String>,
    pub direct_routing: bool,
    /// Agents masquerade traffic leaving the cluster network (`--ip-masq`).
    pub ip_masq: bool,
    pub workloads_per_host: usize,
    /// Processes outlive this process (`overlayctl lab up`) rather than being children.
    pub detach: bool,
    /// Extra agent flags.
    pub agent_args: Vec<String>,
    /// Extra environment of the agents (e.g. a PATH without iptables); `OVERLAY_*`
    /// variables are not passed (see `netns::lab_env`): use flags for those.
    pub agent_env: Vec<(String, String)>,
    /// Extra controller flags (`--name=value`); one the lab also sets replaces the lab's.
    pub controller_args: Vec<String>,
    /// Plaintext gRPC (`--insecure` everywhere) instead of mutual TLS with certificates
    /// made for the lab.
    pub insecure: bool,
}

impl LabSpec {
    pub fn new(name: &str, ns_prefix: &str, dir: &Path, bin_dir: &Path) -> LabSpec {
        LabSpec {
            name: name.into(),
            ns_prefix: ns_prefix.into(),
            dir: dir.into(),
            bin_dir: bin_dir.into(),
            hosts: 3,
            backend: "vxlan".into(),
            network: "10.244.0.0/16".into(),
            subnet_max: None,
            lease_ttl: None,
            direct_routing: false,
            ip_masq: false,
            workloads_per_host: 1,
            detach: false,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            controller_args: Vec::new(),
            insecure: false,
        }
    }
}

impl Lab {
    /// Builds the whole lab and waits until every agent is ready. `progress` is told each
    /// step as it starts.
    pub fn up(spec: &LabSpec, progress: &mut dyn FnMut(&str)) -> Result<Lab, LabError> {
        if spec.hosts == 0 || spec.hosts > 200 {
            return Err(LabError::Invalid(format!(
                "--hosts {}: use 1 to 200",
                spec.hosts
            )));
        }
        if spec.dir.join(STATE_FILE).exists()
            || !netns::list_with_prefix(&format!("{}-", spec.ns_prefix)).is_empty()
        {
            return Err(LabError::Exists(spec.name.clone()));
        }
        // What a failed `up` left: its logs only (no state file, no namespace).
        if spec.dir.exists() {
            std::fs::remove_dir_all(&spec.dir).map_err(|e| file_err(&spec.dir, e))?;
        }
        std::fs::create_dir_all(&spec.dir).map_err(|e| file_err(&spec.dir, e))?;
        let ul = format!("{}-ul", spec.ns_prefix);
        let mut lab = Lab {
            state: LabState {
                name: spec.name.clone(),
                ns_prefix: spec.ns_prefix.clone(),
                dir: spec.dir.clone(),
                bin_dir: spec.bin_dir.clone(),
                backend: spec.backend.clone(),
                network: spec.network.clone(),
                underlay_ns: ul.clone(),
                controller_url: if spec.insecure {
                    format!("http://{UNDERLAY_GATEWAY}:{CONTROLLER_PORT}")
                } else {
                    format!("https://{UNDERLAY_GATEWAY}:{CONTROLLER_PORT}")
                },
                pki: (!spec.insecure).then(|| spec.dir.join("pki")),
                etcd_pid: None,
                controller_pid: None,
                etcd_log: spec.dir.join("etcd.log"),
                controller_log: spec.dir.join("controller.log"),
                agent_args: spec
                    .ip_masq
                    .then(|| "--ip-masq".to_string())
                    .into_iter()
                    .chain(spec.agent_args.iter().cloned())
                    .collect(),
                agent_env: spec.agent_env.clone(),
                hosts: Vec::new(),
                workloads: Vec::new(),
            },
            children: Vec::new(),
            detach: spec.detach,
            down_on_drop: !spec.detach,
        };
        // From here on, a failure tears down what was made, except the logs: they say why
        // (`lab down` or the next `lab up` removes them).
        match lab.build(spec, progress) {
            Ok(()) => Ok(lab),
            Err(e) => {
                lab.down_on_drop = false;
                lab.stop_children();
                let _ = teardown_keeping_logs(&spec.ns_prefix, &spec.dir);
                Err(e)
            }
        }
    }

    fn build(&mut self, spec: &LabSpec, progress: &mut dyn FnMut(&str)) -> Result<(), LabError> {
        let ul = self.state.underlay_ns.clone();
        progress(&format!(
            "underlay: namespace {ul}, bridge br0 {UNDERLAY_GATEWAY}/24"
        ));
        netns::create(&ul)?;
        self.state.save()?;
        netns::ip_in(
            &ul,
            &[
                "link",
                "add",
                "br0",
                "address",
                "02:42:c0:00:02:01",
                "type",
                "bridge",
            ],
        )?;
        netns::ip_in(
            &ul,
            &[
                "addr",
                "add",
                &format!("{UNDERLAY_GATEWAY}/24"),
                "dev",
                "br0",
            ],
        )?;
        netns::ip_in(&ul, &["link", "set", "br0", "up"])?;

        if let Some(pki) = self.state.pki.clone() {
            progress(&format!(
                "certificates: a CA and one certificate per component in {}",
                pki.display()
            ));
            let bin = spec.bin_dir.join("overlayctl");
            netns::run(
                Command::new(&bin)
                    .args(["certs", "init", "--dir"])
                    .arg(&pki),
            )?;
            self.state.issue_cert("controller", &[UNDERLAY_GATEWAY])?;
            self.state.issue_cert("admin", &[])?;
        }
        progress("etcd: starting in the underlay namespace");
        let etcd_dir = spec.dir.join("etcd");
        let etcd_args: Vec<String> = vec![
            "--name=lab".into(),
            format!("--data-dir={}", etcd_dir.display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=lab=http://127.0.0.1:2380".into(),
            "--heartbeat-interval=10".into(),
            "--election-timeout=50".into(),
            "--log-level=error".into(),
        ];
        let etcd_log = self.state.etcd_log.clone();
        self.state.etcd_pid = Some(self.spawn(
            "etcd",
            &ul,
            Command::new("etcd").args(&etcd_args),
            &etcd_log,
        )?);
        wait_component(
            "etcd",
            self.state.etcd_pid,
            &etcd_log,
            Duration::from_secs(20),
            || {
                http_get_in(&ul, "127.0.0.1", 2379, "/health")
                    .is_some_and(|(_, b)| b.contains("true"))
            },
        )?;

        progress(&format!(
            "controller: listening on {}",
            self.state.controller_url
        ));
        let mut ctl_args: Vec<String> = vec![
            "--etcd-endpoints=http://127.0.0.1:2379".into(),
            format!("--listen={UNDERLAY_GATEWAY}:{CONTROLLER_PORT}"),
            "--health-listen=127.0.0.1:7401".into(),
        ];
        ctl_args.extend(self.state.tls_args("controller"));
        for extra in &spec.controller_args {
            let name = extra.split('=').next().unwrap_or_default();
            ctl_args.retain(|a| a.split('=').next() != Some(name));
            ctl_args.push(extra.clone());
        }
        let ctl_bin = spec.bin_dir.join("overlay-controller");
        let ctl_log = self.state.controller_log.clone();
        self.state.controller_pid = Some(self.spawn(
            "controller",
            &ul,
            Command::new(&ctl_bin).args(&ctl_args),
            &ctl_log,
        )?);
        wait_component(
            "the controller",
            self.state.controller_pid,
            &ctl_log,
            Duration::from_secs(20),
            || http_get_in(&ul, "127.0.0.1", 7401, "/readyz").is_some_and(|(c, _)| c == 200),
        )?;
        let mut config = vec![
            "config".to_string(),
            "set".into(),
            "--network".into(),
            spec.network.clone(),
            "--backend".into(),
            spec.backend.clone(),
        ];
        if let Some(ttl) = &spec.lease_ttl {
            config.extend(["--lease-ttl".into(), ttl.clone()]);
        }
        if let Some(max) = &spec.subnet_max {
            config.extend(["--subnet-max".into(), max.clone()]);
        }
        if spec.direct_routing {
            config.push("--direct-routing".into());
        }
        self.overlayctl(&config)?;
        self.state.save()?;

        for i in 1..=spec.hosts {
            let name = format!("h{i}");
            progress(&format!(
                "host {name}: namespace, underlay 192.0.2.{}, agent",
                10 + i
            ));
            self.add_host(&name, i)?;
        }
        progress(&format!(
            "agents: waiting until all {} are ready",
            spec.hosts
        ));
        for h in 0..spec.hosts {
            let host = self.state.hosts[h].clone();
            wait_component(
                &format!("the agent on {}", host.name),
                host.agent_pid,
                &host.agent_log,
                Duration::from_secs(60),
                || self.state.agent_ready(&host),
            )?;
        }
        for h in 0..spec.hosts {
            for j in 1..=spec.workloads_per_host {
                let host = self.state.hosts[h].name.clone();
                progress(&format!("workload {host}/w{j}: CNI ADD on {host}"));
                self.add_workload(&host, &format!("w{j}"))?;
            }
        }
        self.state.save()
    }
}
