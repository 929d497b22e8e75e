//! The CNI commands: ADD, DEL, CHECK, VERSION, GC and STATUS.
//!
//! Every command runs in the host's network namespace (where the runtime starts the
//! plugin) and reaches into the container's namespace only through a netlink socket
//! opened there, so no command ever leaves a thread in the wrong namespace.
//!
//! The host end of the veth is named from the attachment alone ([`host_veth_name`]):
//! DEL finds and deletes it without the container namespace (containerd sends none),
//! and deleting one end of a veth pair deletes the other, wherever it lives.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use overlay_core::subnet::gateway;

use super::config::{Attachment, CniEnv, Command, NetConf, LATEST_VERSION, SUPPORTED_VERSIONS};
use super::error::{CniError, ErrorCode};
use super::ipam::{IpamError, IpamStore};
use super::result::{CniResult, Dns, Interface, IpConfig, RouteEntry};
use crate::datapath::netlink::{open_netns, Netlink, NetlinkError, NetnsError};
use crate::files::{read_to_string_bounded, SubnetEnv, MAX_SUBNET_ENV_BYTES};

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs one CNI invocation. Never fails: errors become the spec's error JSON.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Output {
    match dispatch(env, stdin).await {
        Ok(stdout) => Output {
            stdout: stdout.unwrap_or_default(),
            exit_code: 0,
        },
        Err(e) => {
            let label = NetConf::peek_version(stdin).unwrap_or_else(|| LATEST_VERSION.into());
            Output {
                stdout: e.to_json(&label),
                exit_code: 1,
            }
        }
    }
}

async fn dispatch(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let command = env.command()?;
    if command == Command::Version {
        return Ok(Some(version(stdin)));
    }
    // The environment before the config, as libcni's skel does: a missing variable is
    // the runtime's bug whatever the config says.
    match command {
        Command::Add | Command::Check => {
            env.require_container_id()?;
            env.require_ifname()?;
            env.require_netns()?;
        }
        Command::Del => {
            env.require_container_id()?;
            env.require_ifname()?;
        }
        _ => {}
    }
    let conf = NetConf::parse(stdin)?;
    match command {
        Command::Add => {
            let result = add(env, &conf).await?;
            Ok(Some(
                serde_json::to_string(&result).expect("results serialize"),
            ))
        }
        Command::Del => del(env, &conf).await.map(|()| None),
        Command::Check => check(env, &conf).await.map(|()| None),
        Command::Gc => gc(&conf).await.map(|()| None),
        Command::Status => status(&conf).await.map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
}

/// VERSION's answer, labelled with the config's version when it is one we speak.
fn version(stdin: &[u8]) -> String {
    let label = NetConf::peek_version(stdin).unwrap_or_else(|| LATEST_VERSION.into());
    serde_json::json!({"cniVersion": label, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// The host-side veth name of an attachment: "ovl" and 8 hex digits of a hash of the
/// container id and interface name (FNV-1a, fixed forever: a DEL from a newer plugin
/// must find what an older one made).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        hash ^= byte as u32;
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("ovl{hash:08x}")
}

fn attachment(env: &CniEnv) -> Result<Attachment, CniError> {
    Ok(Attachment {
        container_id: env.require_container_id()?.to_string(),
        ifname: env.require_ifname()?.to_string(),
    })
}

fn kernel(e: NetlinkError) -> CniError {
    CniError::new(ErrorCode::Kernel, e.to_string())
}

fn ipam(e: IpamError) -> CniError {
    let code = match e {
        IpamError::Io { .. } | IpamError::Write(_) => ErrorCode::Io,
        IpamError::Exhausted { .. } | IpamError::TooSmall(_) => ErrorCode::AddressesExhausted,
    };
    CniError::new(code, e.to_string())
}

fn check_failed(msg: String) -> CniError {
    CniError::new(ErrorCode::CheckFailed, msg)
}

/// The agent's `subnet.env`; a missing one means the agent is not ready yet.
fn read_subnet_env(path: &Path) -> Result<SubnetEnv, CniError> {
    let text = read_to_string_bounded(path, MAX_SUBNET_ENV_BYTES).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CniError::new(
                ErrorCode::TryAgainLater,
                format!(
                    "{} does not exist: overlay-agent has not leased a subnet for this host \
                     yet (is it running?)",
                    path.display()
                ),
            )
        } else {
            CniError::new(ErrorCode::Io, format!("cannot read {}", path.display())).with_details(e)
        }
    })?;
    SubnetEnv::parse(&text).map_err(|e| {
        CniError::new(
            ErrorCode::Io,
            format!("{} is not a valid subnet.env", path.display()),
        )
        .with_details(e)
    })
}

/// The index of the agent's bridge; a missing bridge means the agent is not ready.
async fn require_bridge(host: &Netlink, name: &str) -> Result<u32, CniError> {
    match host.link_info(name).await.map_err(kernel)? {
        Some(link) if link.kind.as_deref() == Some("bridge") => Ok(link.index),
        Some(link) => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "{name} is a {} device, not overlay-agent's bridge",
                link.kind.as_deref().unwrap_or("plain")
            ),
        )),
        None => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "bridge {name} does not exist: overlay-agent is not ready on this host (or \
                 runs without a bridge)"
            ),
        )),
    }
}

/// Opens the container's namespace and a netlink socket inside it. CNI_NETNS is checked
/// first ([`open_netns`]): anything but another network namespace is refused before any
/// kernel work, with code 4 ("invalid necessary environment variables": the spec's code
/// for a CNI_* variable that names something unusable; 7 is for the network config on
/// stdin), except a missing namespace, which is code 3 ("container unknown").
fn open_container(path: &str) -> Result<(std::fs::File, Netlink), CniError> {
    let file = open_netns(Path::new(path)).map_err(|e| match e {
        NetnsError::Open(io) if io.kind() == std::io::ErrorKind::NotFound => CniError::new(
            ErrorCode::UnknownContainer,
            format!("CNI_NETNS: network namespace {path} does not exist"),
        ),
        NetnsError::Open(io) => CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_NETNS={path} cannot be opened"),
        )
        .with_details(io),
        NetnsError::NotNetns(what) => CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_NETNS={path} is not a network namespace ({what})"),
        ),
        NetnsError::Own => CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_NETNS={path} is the plugin's own network namespace (the host's), not \
                 a container's: refusing to touch it"
            ),
        ),
    })?;
    let netlink = Netlink::connect_in_netns(&file).map_err(|e| match e.errno() {
        Some(libc::EINVAL) => CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_NETNS={path} is not a network namespace"),
        ),
        _ => kernel(e),
    })?;
    Ok((file, netlink))
}

async fn add(env: &CniEnv, conf: &NetConf) -> Result<CniResult, CniError> {
    let attachment = attachment(env)?;
    let netns_path = env.require_netns()?;
    let subnet_env = read_subnet_env(&conf.subnet_file)?;
    let subnet = subnet_env.subnet.ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            "the host has no IPv4 subnet (an IPv6-only cluster)".to_string(),
        )
    })?;
    let mtu = conf.mtu.unwrap_or(subnet_env.mtu);
    let (netns, container) = open_container(netns_path)?;
    let host = Netlink::connect().map_err(kernel)?;
    let bridge_index = require_bridge(&host, &conf.bridge).await?;

    // The lock is held only while choosing: the kernel work below needs no lock, and
    // holding it would serialize every concurrent ADD behind the slowest one.
    let ip = IpamStore::open(&conf.data_dir, &conf.name)
        .and_then(|mut store| store.allocate(&attachment, subnet))
        .map_err(ipam)?;
    let address = Ipv4Net::new(ip, subnet.prefix_len()).expect("prefix of a subnet");
    let plumbed = Plumbing {
        host: &host,
        container: &container,
        netns: &netns,
        host_name: host_veth_name(&attachment.container_id, &attachment.ifname),
        ifname: &attachment.ifname,
        bridge_index,
        hairpin: conf.hairpin_mode,
        mtu,
        address,
        gateway: gateway(subnet).addr(),
    }
    .run()
    .await;
    let (host_link, container_link) = match plumbed {
        Ok(links) => links,
        Err(e) => {
            // Undo what this ADD made; the runtime's DEL would too, but may never come
            // when the runtime gives up on the container.
            let _ = host
                .delete_link(&host_veth_name(
                    &attachment.container_id,
                    &attachment.ifname,
                ))
                .await;
            if let Ok(store) = IpamStore::open(&conf.data_dir, &conf.name) {
                let _ = store.release(&attachment);
            }
            return Err(e);
        }
    };

    let gw = gateway(subnet).addr();
    let with_mtu = conf.is_1_1().then_some(mtu);
    let mut result = match &conf.prev_result {
        // Not first in a chain: extend what the plugins before this one made.
        Some(prev) => prev.clone(),
        None => CniResult {
            cni_version: conf.cni_version.clone(),
            interfaces: Vec::new(),
            ips: Vec::new(),
            routes: Vec::new(),
            dns: Dns::default(),
            extra: Default::default(),
        },
    };
    result.cni_version = conf.cni_version.clone();
    result.interfaces.push(Interface {
        name: host_link.name.clone(),
        mac: host_link.mac.map(|m| m.to_string()).unwrap_or_default(),
        mtu: with_mtu,
        sandbox: None,
        extra: Default::default(),
    });
    result.interfaces.push(Interface {
        name: container_link.name.clone(),
        mac: container_link
            .mac
            .map(|m| m.to_string())
            .unwrap_or_default(),
        mtu: with_mtu,
        sandbox: Some(netns_path.to_string()),
        extra: Default::default(),
    });
    result.ips.push(IpConfig {
        address: IpNet::V4(address),
        gateway: Some(IpAddr::V4(gw)),
        interface: Some(result.interfaces.len() - 1),
        extra: Default::default(),
    });
    result.routes.push(RouteEntry {
        dst: IpNet::V4(Ipv4Net::default()),
        gw: Some(IpAddr::V4(gw)),
        extra: Default::default(),
    });
    Ok(result)
}

/// The kernel side of ADD.
struct Plumbing<'a> {
    host: &'a Netlink,
    container: &'a Netlink,
    netns: &'a std::fs::File,
    host_name: String,
    ifname: &'a str,
    bridge_index: u32,
    hairpin: bool,
    mtu: u32,
    address: Ipv4Net,
    gateway: Ipv4Addr,
}

impl Plumbing<'_> {
    /// Creates and configures the veth pair; returns the host and container links.
    async fn run(
        &self,
    ) -> Result<(crate::datapath::LinkInfo, crate::datapath::LinkInfo), CniError> {
        let (host, container, ifname) = (self.host, self.container, self.ifname);
        // A link with this name can only be left from an earlier ADD of this same
        // attachment (the name is derived from it): start over.
        host.delete_link(&self.host_name).await.map_err(kernel)?;
        host.add_veth_into_netns(
            &self.host_name,
            ifname,
            self.netns,
            self.mtu,
            self.bridge_index,
        )
        .await
        .map_err(|e| match e.errno() {
            Some(libc::EEXIST) => CniError::new(
                ErrorCode::Kernel,
                format!("the container already has an interface named {ifname}"),
            ),
            _ => kernel(e),
        })?;
        if self.hairpin {
            host.set_bridge_port_hairpin(&self.host_name, true)
                .await
                .map_err(kernel)?;
        }
        container
            .add_address(ifname, self.address)
            .await
            .map_err(kernel)?;
        container.set_link_up(ifname, None).await.map_err(kernel)?;
        container
            .replace_default_route(ifname, self.gateway)
            .await
            .map_err(kernel)?;
        let gone = |side: &str, name: &str| {
            CniError::new(
                ErrorCode::Kernel,
                format!("{name} vanished from the {side} namespace during ADD"),
            )
        };
        let host_link = host
            .link_info(&self.host_name)
            .await
            .map_err(kernel)?
            .ok_or_else(|| gone("host", &self.host_name))?;
        let container_link = container
            .link_info(ifname)
            .await
            .map_err(kernel)?
            .ok_or_else(|| gone("container", ifname))?;
        Ok((host_link, container_link))
    }
}

async fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let attachment = attachment(env)?;
    // The kernel first, the address last: an address is free only once nothing uses it.
    let host = Netlink::connect().map_err(kernel)?;
    host.delete_link(&host_veth_name(
        &attachment.container_id,
        &attachment.ifname,
    ))
    .await
    .map_err(kernel)?;
    if let Some(store) = IpamStore::open_existing(&conf.data_dir, &conf.name).map_err(ipam)? {
        store.release(&attachment).map_err(ipam)?;
    }
    Ok(())
}

async fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let attachment = attachment(env)?;
    let ifname = attachment.ifname.as_str();
    let netns_path = env.require_netns()?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "CHECK needs prevResult (the result of the ADD)",
        )
    })?;
    let (index, expected_iface) = prev
        .sandbox_interface(ifname)
        .ok_or_else(|| check_failed(format!("prevResult lists no container interface {ifname}")))?;
    let expected: Vec<(Ipv4Net, Option<Ipv4Addr>)> = prev
        .ips_of(index)
        .filter_map(|ip| match (ip.address, ip.gateway) {
            (IpNet::V4(a), Some(IpAddr::V4(g))) => Some((a, Some(g))),
            (IpNet::V4(a), _) => Some((a, None)),
            _ => None,
        })
        .collect();
    let Some(&(our_address, our_gateway)) = expected.first() else {
        return Err(check_failed(format!(
            "prevResult assigns no IPv4 address to {ifname}"
        )));
    };

    let (_netns, container) = open_container(netns_path)?;
    let link = container
        .link_info(ifname)
        .await
        .map_err(kernel)?
        .ok_or_else(|| check_failed(format!("the container has no interface {ifname}")))?;
    if !expected_iface.mac.is_empty() {
        let have = link.mac.map(|m| m.to_string()).unwrap_or_default();
        if !have.eq_ignore_ascii_case(&expected_iface.mac) {
            return Err(check_failed(format!(
                "{ifname} has MAC {have}, prevResult says {}",
                expected_iface.mac
            )));
        }
    }
    if !link.up {
        return Err(check_failed(format!("{ifname} is down")));
    }
    let held = container.addresses(ifname).await.map_err(kernel)?;
    for (address, _) in &expected {
        if !held.contains(&IpNet::V4(*address)) {
            return Err(check_failed(format!(
                "{ifname} lacks address {address} (it has {held:?})"
            )));
        }
    }
    let routes = container.routes_of(ifname).await.map_err(kernel)?;
    for route in &prev.routes {
        let IpNet::V4(dst) = route.dst else { continue };
        let gw = match route.gw {
            Some(IpAddr::V4(g)) => Some(g),
            Some(IpAddr::V6(_)) => continue,
            None => our_gateway,
        };
        if !routes.iter().any(|r| r.dst == dst && r.gateway == gw) {
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(check_failed(format!(
                "the container has no route to {dst}{via} on {ifname}"
            )));
        }
    }

    let host = Netlink::connect().map_err(kernel)?;
    let host_name = host_veth_name(&attachment.container_id, ifname);
    let bridge_index = match host.link_index(&conf.bridge).await.map_err(kernel)? {
        Some(i) => i,
        None => {
            return Err(check_failed(format!(
                "bridge {} does not exist on the host",
                conf.bridge
            )))
        }
    };
    match host.link_controller(&host_name).await {
        Ok(Some(i)) if i == bridge_index => {}
        Ok(_) => {
            return Err(check_failed(format!(
                "{host_name} is not attached to bridge {}",
                conf.bridge
            )))
        }
        Err(NetlinkError::NoSuchLink { .. }) => {
            return Err(check_failed(format!(
                "the host end {host_name} of {ifname} does not exist"
            )))
        }
        Err(e) => return Err(kernel(e)),
    }

    let reserved = IpamStore::open(&conf.data_dir, &conf.name)
        .and_then(|store| store.find(&attachment, our_address.trunc()))
        .map_err(ipam)?;
    if reserved != Some(our_address.addr()) {
        return Err(check_failed(format!(
            "address {} is not reserved for {}/{ifname} (reserved: {reserved:?})",
            our_address.addr(),
            attachment.container_id
        )));
    }
    Ok(())
}

fn require_1_1(conf: &NetConf, command: &str) -> Result<(), CniError> {
    if conf.is_1_1() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "{command} needs cniVersion 1.1.0; the config says {}",
                conf.cni_version
            ),
        ))
    }
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    require_1_1(conf, "GC")?;
    let valid = conf.valid_attachments.as_deref().ok_or_else(|| {
        // Absent is not "empty": releasing every address on a malformed request would
        // cut every container of the host off.
        CniError::new(
            ErrorCode::InvalidConfig,
            "GC needs cni.dev/valid-attachments",
        )
    })?;
    let Some(store) = IpamStore::open_existing(&conf.data_dir, &conf.name).map_err(ipam)? else {
        return Ok(());
    };
    let released = store.retain_only(valid).map_err(ipam)?;
    drop(store);
    if released.is_empty() {
        return Ok(());
    }
    // Their veths too, when they are still there (a runtime that lost track of them).
    let host = Netlink::connect().map_err(kernel)?;
    let mut failures = Vec::new();
    for (_, a) in &released {
        if let Err(e) = host
            .delete_link(&host_veth_name(&a.container_id, &a.ifname))
            .await
        {
            failures.push(e.to_string());
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::Kernel,
            "GC released the addresses but not every veth",
        )
        .with_details(failures.join("; ")))
    }
}

async fn status(conf: &NetConf) -> Result<(), CniError> {
    require_1_1(conf, "STATUS")?;
    let not_available = |e: CniError| CniError {
        code: ErrorCode::PluginNotAvailable,
        ..e
    };
    read_subnet_env(&conf.subnet_file).map_err(not_available)?;
    let host = Netlink::connect().map_err(kernel).map_err(not_available)?;
    require_bridge(&host, &conf.bridge)
        .await
        .map_err(not_available)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> CniEnv {
        CniEnv::from_vars(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
    }

    fn run_sync(env: &CniEnv, stdin: &str) -> Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(env, stdin.as_bytes()))
    }

    fn error_code(out: &Output) -> u64 {
        assert_ne!(out.exit_code, 0, "{}", out.stdout);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["code"].as_u64().unwrap()
    }

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("c1", "eth0");
        assert_eq!(a, host_veth_name("c1", "eth0"));
        assert_eq!(a.len(), 11);
        assert!(a.starts_with("ovl"));
        assert_ne!(a, host_veth_name("c1", "eth1"));
        assert_ne!(host_veth_name("a", "beth0"), host_veth_name("ab", "eth0"));
        // Pinned: changing the hash would orphan every existing veth on upgrade.
        assert_eq!(host_veth_name("", ""), "ovl050c5d1f");
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let out = run_sync(
            &env(&[("CNI_COMMAND", "VERSION")]),
            r#"{"cniVersion":"1.0.0"}"#,
        );
        assert_eq!(out.exit_code, 0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["1.0.0", "1.1.0"])
        );
        let out = run_sync(&env(&[("CNI_COMMAND", "VERSION")]), "");
        assert_eq!(out.exit_code, 0);
    }

    #[test]
    fn environment_and_config_errors_need_no_kernel() {
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"overlay-cni"}"#;
        assert_eq!(error_code(&run_sync(&env(&[]), conf)), 4);
        assert_eq!(
            error_code(&run_sync(&env(&[("CNI_COMMAND", "FOO")]), conf)),
            4
        );
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(error_code(&run_sync(&env(&add), conf)), 4, "no CNI_NETNS");
        let mut with_netns = add.to_vec();
        with_netns.push(("CNI_NETNS", "/run/netns/x"));
        assert_eq!(error_code(&run_sync(&env(&with_netns), "{")), 6);
        let out = run_sync(
            &env(&with_netns),
            r#"{"cniVersion":"0.3.1","name":"n","type":"overlay-cni"}"#,
        );
        assert_eq!(error_code(&out), 1);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], LATEST_VERSION);
        let gc = env(&[("CNI_COMMAND", "GC")]);
        assert_eq!(error_code(&run_sync(&gc, conf)), 1, "GC on a 1.0.0 config");
        let conf11 = r#"{"cniVersion":"1.1.0","name":"n","type":"overlay-cni"}"#;
        assert_eq!(error_code(&run_sync(&gc, conf11)), 7, "GC without a list");
    }

    #[test]
    fn an_oversized_config_is_refused_for_every_command() {
        let mut stdin = r#"{"cniVersion":"1.0.0","name":"n","type":"overlay-cni"}"#.to_string();
        stdin.push_str(&" ".repeat(super::super::config::MAX_STDIN_BYTES));
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let out = run_sync(&del, &stdin);
        assert_eq!(error_code(&out), 6);
        assert!(out.stdout.contains("over the limit"), "{}", out.stdout);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], LATEST_VERSION);
    }

    #[test]
    fn a_subnet_env_that_is_too_large_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        std::fs::write(&path, "#".repeat(MAX_SUBNET_ENV_BYTES + 1)).unwrap();
        let e = read_subnet_env(&path).unwrap_err();
        assert_eq!(e.code, ErrorCode::Io);
        assert!(e.details.contains("larger than 65536 bytes"), "{e}");
    }

    #[test]
    fn add_without_subnet_env_asks_to_try_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "overlay-cni",
            "subnetFile": dir.path().join("subnet.env"), "dataDir": dir.path(),
        })
        .to_string();
        let out = run_sync(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/run/netns/x"),
            ]),
            &conf,
        );
        assert_eq!(error_code(&out), 11);
        assert!(
            out.stdout.contains("subnet.env does not exist"),
            "{}",
            out.stdout
        );
    }
}
