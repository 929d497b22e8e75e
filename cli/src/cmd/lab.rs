//! `overlayctl lab`: a whole Overlay cluster on this machine, made of network namespaces
//! (the [`overlay_lab`] crate does the building; this module is its command line).
//!
//! A lab outlives the command that made it: `lab up` starts etcd, the controller and the
//! agents detached, and records everything in `/run/overlay-lab/<name>/lab.json`, which
//! every later `lab` command reads. `lab down` needs none of it: it finds the lab's
//! namespaces by their prefix (`ovl-<name>-`), so a lab left half-made by a crash is
//! removed too.
//!
//! `lab exec` and `lab ctl` replace this process with the command (setns, then exec), so
//! the command's exit code, signals and terminal are its own: `lab exec h1 -- bash` is
//! an interactive shell on host h1, and scripts see the exit code of what they ran.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use overlay_lab::{Lab, LabSpec, LabState, PortMapping};
use serde::Serialize;

use crate::output::{json_pretty, print, Format, Table};

/// The binaries `lab up` runs, found next to the running overlayctl.
const LAB_BINARIES: &[&str] = &[
    "overlay-agent",
    "overlay-controller",
    "overlay-cni",
    "overlayctl",
];
pub const DEFAULT_LAB: &str = "lab";

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build a lab: underlay, etcd, controller, N hosts with agents, workloads via CNI
    Up(UpArgs),
    /// Show the lab's hosts (subnet, agent ready) and workloads (address), and its logs
    Status(NameArg),
    /// Run a command in a host (h1) or workload (h1/w1) namespace; its exit code is ours
    Exec(ExecArgs),
    /// Run overlayctl against the lab's controller (e.g. `lab ctl -- leases`)
    Ctl(CtlArgs),
    /// Add or remove a workload (a namespace attached by the CNI plugin)
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Remove the lab: every namespace, process and file it made (safe to repeat)
    Down(NameArg),
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// The lab's name (lower-case letters and digits)
    #[arg(long, env = "OVERLAY_LAB", default_value = DEFAULT_LAB)]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub lab: NameArg,
    /// Number of hosts
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=200))]
    pub hosts: u16,
    /// The datapath backend
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw"])]
    pub backend: String,
    /// Workloads started on each host (w1, w2, ...)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=50))]
    pub workloads_per_host: u16,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub lab: NameArg,
    /// A host (h1) or a workload (h1/w1)
    pub target: String,
    /// The command and its arguments (after `--`)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    #[command(flatten)]
    pub lab: NameArg,
    /// overlayctl's arguments (after `--`), e.g. `leases` or `-o json config get`
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Add workload NAME on HOST (CNI ADD), optionally publishing ports on the host
    Add {
        #[command(flatten)]
        lab: NameArg,
        /// The host, e.g. h1
        host: String,
        /// The workload's name, e.g. web
        #[arg(value_name = "NAME")]
        workload: String,
        /// HOSTPORT:PORT[/tcp|udp]: the host's port forwards to the workload's (portmap)
        #[arg(long, value_name = "HOSTPORT:PORT[/PROTO]", value_parser = parse_publish)]
        publish: Vec<PortMapping>,
    },
    /// Remove workload NAME from HOST (CNI DEL)
    Rm {
        #[command(flatten)]
        lab: NameArg,
        host: String,
        #[arg(value_name = "NAME")]
        workload: String,
    },
}

fn parse_publish(s: &str) -> Result<PortMapping, String> {
    s.parse()
}

pub async fn run(command: LabCommand, format: Format) -> anyhow::Result<()> {
    require_root()?;
    match command {
        LabCommand::Up(args) => up(args, format),
        LabCommand::Status(a) => status(&a.name, format),
        LabCommand::Exec(a) => exec(&a.lab.name, &a.target, &a.command),
        LabCommand::Ctl(a) => ctl(&a.lab.name, &a.args),
        LabCommand::Workload(WorkloadCommand::Add {
            lab,
            host,
            workload,
            publish,
        }) => workload_add(&lab.name, &host, &workload, &publish, format),
        LabCommand::Workload(WorkloadCommand::Rm {
            lab,
            host,
            workload,
        }) => workload_rm(&lab.name, &host, &workload),
        LabCommand::Down(a) => down(&a.name),
    }
}

fn require_root() -> anyhow::Result<()> {
    if !overlay_lab::running_as_root() {
        bail!(
            "lab commands need root (they create and enter network namespaces): run them with sudo"
        );
    }
    Ok(())
}

/// How the user ran us (`target/debug/overlayctl`, or `overlayctl` from PATH): the
/// commands we suggest must work when pasted.
fn invoked_as() -> String {
    std::env::args()
        .next()
        .filter(|a| a.contains('/'))
        .unwrap_or_else(|| "overlayctl".into())
}

/// ` --name NAME`, or nothing for the default lab: for the commands we suggest.
fn name_flag(name: &str) -> String {
    if name == DEFAULT_LAB {
        String::new()
    } else {
        format!(" --name {name}")
    }
}

/// The lab's state; a clear error when it does not exist or is half-made.
fn load(name: &str) -> anyhow::Result<LabState> {
    overlay_lab::validate_lab_name(name)?;
    let dir = overlay_lab::dir_for(name);
    if dir.join(overlay_lab::STATE_FILE).exists() {
        return Ok(LabState::load(&dir)?);
    }
    let prefix = format!("{}-", overlay_lab::ns_prefix_for(name));
    let namespaces = overlay_lab::netns::list_with_prefix(&prefix);
    if dir.exists() && namespaces.is_empty() {
        bail!(
            "lab {name:?} failed to start earlier; its logs are in {} (`overlayctl lab down{}` removes them)",
            dir.display(),
            name_flag(name)
        );
    }
    if dir.exists() || !namespaces.is_empty() {
        bail!(
            "lab {name:?} is half-made (no {}): remove it with `overlayctl lab down{}`",
            dir.join(overlay_lab::STATE_FILE).display(),
            name_flag(name)
        );
    }
    Err(overlay_lab::LabError::Missing(name.to_string()).into())
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running overlayctl")?;
    let dir = exe
        .parent()
        .context("the running overlayctl has no directory")?
        .to_path_buf();
    for bin in LAB_BINARIES {
        if !dir.join(bin).is_file() {
            bail!(
                "{} is missing: the lab runs the binaries next to overlayctl (build them all \
                 with `cargo build --workspace --bins`)",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

fn up(args: UpArgs, format: Format) -> anyhow::Result<()> {
    let name = args.lab.name;
    overlay_lab::validate_lab_name(&name)?;
    let bin_dir = bin_dir()?;
    if !on_path("etcd") {
        bail!("etcd is not installed (apt-get install etcd-server, or `make deps`)");
    }
    if !on_path("ip") {
        bail!("ip is not installed (apt-get install iproute2)");
    }
    overlay_lab::cni::find_plugin(
        "portmap",
        &overlay_lab::cni::SYSTEM_PLUGIN_DIRS
            .iter()
            .map(PathBuf::from)
            .collect::<Vec<_>>(),
    )?;
    let mut spec = LabSpec::new(
        &name,
        &overlay_lab::ns_prefix_for(&name),
        &overlay_lab::dir_for(&name),
        &bin_dir,
    );
    spec.hosts = args.hosts.into();
    spec.backend = args.backend;
    spec.workloads_per_host = args.workloads_per_host.into();
    spec.detach = true;
    let taken = !overlay_lab::netns::list_with_prefix(&format!("{}-", spec.ns_prefix)).is_empty();
    // A directory with only logs is what a failed `lab up` kept: `Lab::up` replaces it.
    if spec.dir.join(overlay_lab::STATE_FILE).exists() || taken {
        return Err(overlay_lab::LabError::Exists(name).into());
    }
    eprintln!(
        "Lab {name:?}: {} hosts, {} backend, state and logs in {}",
        spec.hosts,
        spec.backend,
        spec.dir.display()
    );
    let mut step = 0;
    let lab = Lab::up(&spec, &mut |what| {
        step += 1;
        eprintln!("  [{step}] {what}");
    })
    .map_err(|e| match e {
        overlay_lab::LabError::Exists(_) => anyhow::Error::from(e),
        e => anyhow::anyhow!(
            "{e}\n(the rest of the lab is removed again; its logs stay in {} until `overlayctl lab down{}`)",
            spec.dir.display(),
            name_flag(&name)
        ),
    })?;
    match format {
        Format::Json => print(&json_pretty(&status_json(&lab.state)))?,
        Format::Table => print(&summary(&lab.state))?,
    }
    Ok(())
}

/// What `lab up` ends with: the lab, and what to try next.
fn summary(state: &LabState) -> String {
    let flag = name_flag(&state.name);
    let me = invoked_as();
    let mut out = format!(
        "\nLab {:?} is up: {} hosts, {} backend, overlay network {}.\n\n",
        state.name,
        state.hosts.len(),
        state.backend,
        state.network
    );
    out += &hosts_table(state).render();
    if !state.workloads.is_empty() {
        out.push('\n');
        out += &workloads_table(state).render();
    }
    out += "\nTry:\n";
    let mut tries: Vec<(String, String)> = vec![(
        format!("{me} lab status{flag}"),
        "hosts, workloads, logs".into(),
    )];
    let w = |host: &str| {
        state
            .workloads
            .iter()
            .find(|w| w.host == host && w.name == "w1")
    };
    match (w("h1"), w("h2")) {
        (Some(a), Some(b)) => tries.push((
            format!("{me} lab exec{flag} h1/w1 -- ping -c 3 {}", b.ip),
            format!("h1/w1 ({}) -> h2/w1 across the overlay", a.ip),
        )),
        _ => tries.push((
            format!("{me} lab exec{flag} h1 -- ping -c 3 192.0.2.1"),
            "a command on host h1".into(),
        )),
    }
    tries.push((
        format!("{me} lab exec{flag} h1 -- ip route show proto 79"),
        "the routes h1's agent programmed".into(),
    ));
    tries.push((
        format!("{me} lab ctl{flag} -- leases"),
        format!(
            "overlayctl against the controller ({})",
            state.controller_url
        ),
    ));
    tries.push((
        format!("{me} lab workload add{flag} h1 web --publish 8080:80"),
        "another workload, port 8080 of h1 -> its port 80".into(),
    ));
    tries.push((
        format!("{me} lab exec{flag} h1 -- bash"),
        "a shell on h1 (h1/w1: a shell in workload w1)".into(),
    ));
    tries.push((
        format!("{me} lab down{flag}"),
        "remove everything the lab made".into(),
    ));
    let width = tries.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    for (cmd, why) in tries {
        out += &format!("  {cmd:width$}   # {why}\n");
    }
    out
}

fn hosts_table(state: &LabState) -> Table {
    let mut t = Table::with_header(&["host", "underlay ip", "subnet", "agent", "namespace"]);
    for h in &state.hosts {
        t.row([
            h.name.clone(),
            h.underlay_ip.clone(),
            state.host_subnet(h).unwrap_or_else(|| "-".into()),
            if state.agent_ready(h) {
                "ready"
            } else {
                "NOT READY"
            }
            .to_string(),
            h.ns.clone(),
        ]);
    }
    t
}

fn workloads_table(state: &LabState) -> Table {
    let mut t = Table::with_header(&["workload", "ip", "published", "namespace"]);
    for w in &state.workloads {
        let published: Vec<String> = w.publish.iter().map(|p| p.to_string()).collect();
        t.row([
            format!("{}/{}", w.host, w.name),
            w.ip.clone(),
            if published.is_empty() {
                "-".into()
            } else {
                published.join(",")
            },
            w.ns.clone(),
        ]);
    }
    t
}

#[derive(Debug, Serialize)]
struct StatusJson {
    name: String,
    backend: String,
    network: String,
    dir: PathBuf,
    underlay_ns: String,
    controller_url: String,
    etcd_log: PathBuf,
    controller_log: PathBuf,
    hosts: Vec<HostJson>,
    workloads: Vec<WorkloadJson>,
}

#[derive(Debug, Serialize)]
struct HostJson {
    name: String,
    namespace: String,
    underlay_ip: String,
    subnet: Option<String>,
    agent_ready: bool,
    agent_pid: Option<u32>,
    log: PathBuf,
}

#[derive(Debug, Serialize)]
struct WorkloadJson {
    name: String,
    host: String,
    namespace: String,
    ip: String,
    publish: Vec<String>,
}

fn status_json(state: &LabState) -> StatusJson {
    StatusJson {
        name: state.name.clone(),
        backend: state.backend.clone(),
        network: state.network.clone(),
        dir: state.dir.clone(),
        underlay_ns: state.underlay_ns.clone(),
        controller_url: state.controller_url.clone(),
        etcd_log: state.etcd_log.clone(),
        controller_log: state.controller_log.clone(),
        hosts: state
            .hosts
            .iter()
            .map(|h| HostJson {
                name: h.name.clone(),
                namespace: h.ns.clone(),
                underlay_ip: h.underlay_ip.clone(),
                subnet: state.host_subnet(h),
                agent_ready: state.agent_ready(h),
                agent_pid: h.agent_pid,
                log: h.agent_log.clone(),
            })
            .collect(),
        workloads: state
            .workloads
            .iter()
            .map(|w| WorkloadJson {
                name: w.name.clone(),
                host: w.host.clone(),
                namespace: w.ns.clone(),
                ip: w.ip.clone(),
                publish: w.publish.iter().map(|p| p.to_string()).collect(),
            })
            .collect(),
    }
}

fn status(name: &str, format: Format) -> anyhow::Result<()> {
    let state = load(name)?;
    let text = match format {
        Format::Json => json_pretty(&status_json(&state)),
        Format::Table => {
            let mut out = format!(
                "Lab {:?}: {} backend, network {}, controller {} (in namespace {})\n\n",
                state.name, state.backend, state.network, state.controller_url, state.underlay_ns
            );
            out += &hosts_table(&state).render();
            out.push('\n');
            if state.workloads.is_empty() {
                out += "No workloads.\n";
            } else {
                out += &workloads_table(&state).render();
            }
            out += "\nLogs:\n";
            let mut logs = Table::plain();
            logs.row(["  etcd".to_string(), state.etcd_log.display().to_string()]);
            logs.row([
                "  controller".to_string(),
                state.controller_log.display().to_string(),
            ]);
            for h in &state.hosts {
                logs.row([
                    format!("  agent {}", h.name),
                    h.agent_log.display().to_string(),
                ]);
            }
            out += &logs.render();
            out
        }
    };
    print(&text)?;
    Ok(())
}

/// Replaces this process with `program args` inside namespace `ns`.
fn exec_in(ns: &str, program: &Path, args: &[String], shown: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    overlay_lab::netns::in_netns(&mut cmd, ns)?;
    let e = cmd.exec();
    bail!("cannot run {} in {shown}: {e}", program.display())
}

fn exec(name: &str, target: &str, command: &[String]) -> anyhow::Result<()> {
    let state = load(name)?;
    let ns = state.target_ns(target)?;
    let (program, args) = command.split_first().context("no command given")?;
    exec_in(&ns, Path::new(program), args, target)
}

fn ctl(name: &str, args: &[String]) -> anyhow::Result<()> {
    let state = load(name)?;
    let me = std::env::current_exe().context("cannot find the running overlayctl")?;
    let mut all = state.admin_client_args();
    all.extend(args.iter().cloned());
    // The lab's own flags, not the caller's OVERLAY_* (say OVERLAY_INSECURE from a
    // plaintext session, which would clash with the lab's TLS flags).
    let mut cmd = Command::new(&me);
    overlay_lab::netns::lab_env(&mut cmd).args(&all);
    overlay_lab::netns::in_netns(&mut cmd, &state.underlay_ns)?;
    let e = cmd.exec();
    bail!("cannot run {} in the underlay namespace: {e}", me.display())
}

fn workload_add(
    name: &str,
    host: &str,
    workload: &str,
    publish: &[PortMapping],
    format: Format,
) -> anyhow::Result<()> {
    let mut lab = Lab::attach(load(name)?);
    let w = lab.add_workload_publishing(host, workload, publish)?;
    match format {
        Format::Json => {
            let all = status_json(&lab.state);
            let one = all
                .workloads
                .into_iter()
                .find(|x| x.host == w.host && x.name == w.name)
                .expect("just added");
            print(&json_pretty(&one))?;
        }
        Format::Table => {
            let mut line = format!("{host}/{workload}: {} (namespace {})", w.ip, w.ns);
            let underlay = &lab.state.host(host)?.underlay_ip;
            for p in &w.publish {
                line += &format!(
                    "\n  {underlay}:{} -> {}:{} ({})",
                    p.host_port, w.ip, p.container_port, p.protocol
                );
            }
            line.push('\n');
            print(&line)?;
        }
    }
    Ok(())
}

fn workload_rm(name: &str, host: &str, workload: &str) -> anyhow::Result<()> {
    let mut lab = Lab::attach(load(name)?);
    lab.remove_workload(host, workload)?;
    print(&format!("{host}/{workload}: removed\n"))?;
    Ok(())
}

fn down(name: &str) -> anyhow::Result<()> {
    overlay_lab::validate_lab_name(name)?;
    let prefix = overlay_lab::ns_prefix_for(name);
    let dir = overlay_lab::dir_for(name);
    let namespaces = overlay_lab::netns::list_with_prefix(&format!("{prefix}-"));
    let existed = dir.exists() || !namespaces.is_empty();
    let errors = overlay_lab::teardown_prefix(&prefix, &dir);
    // The parent too once no lab is left, so that `down` leaves no trace; a lab being made
    // at this moment keeps it (it is not empty then, and removing fails harmlessly).
    let _ = std::fs::remove_dir(overlay_lab::LAB_ROOT);
    if !errors.is_empty() {
        let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        bail!("lab {name:?} not fully removed: {}", all.join("; "));
    }
    if existed {
        print(&format!(
            "lab {name}: removed ({} namespaces, {})\n",
            namespaces.len(),
            dir.display()
        ))?;
    } else {
        print(&format!("lab {name}: nothing to remove\n"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::tests::parse;
    use crate::Command;

    use super::*;

    fn lab(args: &[&str]) -> LabCommand {
        let mut all = vec!["lab"];
        all.extend_from_slice(args);
        match parse(&all)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
        {
            Command::Lab(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn up_has_the_documented_defaults() {
        let LabCommand::Up(a) = lab(&["up"]) else {
            panic!()
        };
        assert_eq!(
            (
                a.lab.name.as_str(),
                a.hosts,
                a.backend.as_str(),
                a.workloads_per_host
            ),
            ("lab", 3, "vxlan", 1)
        );
        assert!(parse(&["lab", "up", "--backend", "udp"]).is_err());
        assert!(parse(&["lab", "up", "--hosts", "0"]).is_err());
    }

    #[test]
    fn exec_takes_the_command_after_the_target() {
        let LabCommand::Exec(a) = lab(&["exec", "--name", "x", "h1/w1", "--", "ping", "-c", "1"])
        else {
            panic!()
        };
        assert_eq!(a.lab.name, "x");
        assert_eq!(a.target, "h1/w1");
        assert_eq!(a.command, ["ping", "-c", "1"]);
        let LabCommand::Ctl(a) = lab(&["ctl", "--", "-o", "json", "leases"]) else {
            panic!()
        };
        assert_eq!(a.args, ["-o", "json", "leases"]);
        assert!(
            parse(&["lab", "exec", "h1"]).is_err(),
            "a command is required"
        );
    }

    #[test]
    fn workload_add_parses_publish_flags() {
        let LabCommand::Workload(WorkloadCommand::Add {
            host,
            workload,
            publish,
            ..
        }) = lab(&[
            "workload",
            "add",
            "h1",
            "web",
            "--publish",
            "8080:80",
            "--publish",
            "53:53/udp",
        ])
        else {
            panic!()
        };
        assert_eq!((host.as_str(), workload.as_str()), ("h1", "web"));
        assert_eq!(
            publish.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            ["8080:80/tcp", "53:53/udp"]
        );
        let msg = crate::usage_message(
            &parse(&["lab", "workload", "add", "h1", "w", "--publish", "80"]).unwrap_err(),
        );
        assert!(msg.starts_with("--publish: "), "{msg}");
    }
}
