//! A lab's workloads, attached and detached the way a container runtime does it: a new
//! namespace, then CNI ADD of the conflist the host's agent installed, run inside the
//! host's namespace; removal is CNI DEL with the ADD's result, then the namespace. The
//! lab never configures a workload's interface itself, so a working workload shows that
//! the agent's conflist and the plugins work.

use crate::{cni, netns, Lab, LabError, PortMapping, WorkloadState, WORKLOAD_IFNAME};

/// A workload name: a short name usable in a namespace and a CNI container id.
pub fn validate_workload_name(name: &str) -> Result<(), LabError> {
    let mut chars = name.chars();
    let ok = name.len() <= 24
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "workload name {name:?}: use 1 to 24 letters, digits and '_', starting with a \
             letter or digit"
        )))
    }
}

impl Lab {
    /// Adds a workload: a namespace attached by the CNI plugin (see [`Lab::add_workload_publishing`]).
    pub fn add_workload(&mut self, host: &str, name: &str) -> Result<WorkloadState, LabError> {
        self.add_workload_publishing(host, name, &[])
    }

    /// Adds a workload the way a container runtime on `host` would: a new namespace, then
    /// CNI ADD of the conflist the host's agent installed (`overlay-cni`, then `portmap`
    /// with `publish` as its `portMappings`), run inside the host's namespace. The address
    /// is the one the plugin assigned.
    pub fn add_workload_publishing(
        &mut self,
        host: &str,
        name: &str,
        publish: &[PortMapping],
    ) -> Result<WorkloadState, LabError> {
        validate_workload_name(name)?;
        let h = self.state.host(host)?.clone();
        if self
            .state
            .workloads
            .iter()
            .any(|w| w.host == host && w.name == name)
        {
            return Err(LabError::Invalid(format!(
                "workload {host}/{name} exists already"
            )));
        }
        for p in publish {
            if let Some(w) = self.state.workloads.iter().find(|w| {
                w.host == host
                    && w.publish
                        .iter()
                        .any(|q| q.host_port == p.host_port && q.protocol == p.protocol)
            }) {
                return Err(LabError::Invalid(format!(
                    "{host} port {}/{} is published by {}/{} already",
                    p.host_port, p.protocol, w.host, w.name
                )));
            }
        }
        let conflist = self.state.conflist(&h)?;
        let ns = format!("{}-{host}-{name}", self.state.ns_prefix);
        let container_id = ns.clone();
        netns::create(&ns)?;
        let netns_path = netns::netns_path(&ns);
        let plugin_dirs = self.state.plugin_dirs();
        let inv = cni::Invocation {
            host_ns: &h.ns,
            container_id: &container_id,
            netns_path: Some(&netns_path),
            ifname: WORKLOAD_IFNAME,
            plugin_dirs: &plugin_dirs,
            port_mappings: publish,
        };
        let result = match cni::add(&conflist, &inv) {
            Ok(r) => r,
            Err(e) => {
                // As a runtime does after a failed ADD: DEL, then drop the namespace.
                let _ = cni::del(&conflist, &inv, None);
                let _ = netns::delete(&ns);
                return Err(e);
            }
        };
        let Some(ip) = cni::result_ipv4(&result) else {
            let _ = cni::del(&conflist, &inv, Some(&result));
            let _ = netns::delete(&ns);
            return Err(LabError::Cni {
                plugin: "overlay-cni".into(),
                command: "ADD".into(),
                message: format!("the result has no IPv4 address: {result}"),
            });
        };
        let w = WorkloadState {
            name: name.into(),
            host: host.into(),
            ns,
            ip,
            container_id,
            publish: publish.to_vec(),
            cni_result: Some(result),
        };
        self.state.workloads.push(w.clone());
        self.state.save()?;
        Ok(w)
    }

    /// Removes a workload as a runtime would: CNI DEL (in reverse, with the ADD's result),
    /// then the namespace. When DEL fails the workload stays, so the command can be
    /// repeated (and `lab down` removes everything regardless).
    pub fn remove_workload(&mut self, host: &str, name: &str) -> Result<(), LabError> {
        let pos = self
            .state
            .workloads
            .iter()
            .position(|w| w.host == host && w.name == name)
            .ok_or_else(|| {
                self.state
                    .host(host)
                    .err()
                    .unwrap_or_else(|| LabError::Invalid(format!("no workload {host}/{name}")))
            })?;
        let w = self.state.workloads[pos].clone();
        let h = self.state.host(host)?.clone();
        if !w.container_id.is_empty() {
            let conflist = self.state.conflist(&h)?;
            let plugin_dirs = self.state.plugin_dirs();
            let netns_path = netns::netns_path(&w.ns);
            let inv = cni::Invocation {
                host_ns: &h.ns,
                container_id: &w.container_id,
                netns_path: netns::exists(&w.ns).then_some(netns_path.as_path()),
                ifname: WORKLOAD_IFNAME,
                plugin_dirs: &plugin_dirs,
                port_mappings: &w.publish,
            };
            cni::del(&conflist, &inv, w.cni_result.as_ref())?;
        }
        netns::delete(&w.ns)?;
        self.state.workloads.remove(pos);
        self.state.save()
    }
}
