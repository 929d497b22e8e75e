//! Where everything lives under a cluster prefix: the config, the lease keys, the index
//! keys.

use super::*;

/// The key layout under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let prefix = prefix.trim_end_matches('/');
        Keys {
            prefix: if prefix.starts_with('/') {
                prefix.to_string()
            } else {
                format!("/{prefix}")
            },
        }
    }

    /// Every key of the cluster is under this.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn leases(&self) -> String {
        format!("{}/leases/", self.prefix)
    }

    /// Every index key is under this.
    pub fn index_prefix(&self) -> String {
        format!("{}/index/", self.prefix)
    }

    pub fn lease(&self, subnet: IpNet) -> String {
        format!("{}/leases/{}", self.prefix, subnet_key(subnet))
    }

    /// The index key naming the lease of `node`.
    pub fn node_index(&self, node: &str) -> String {
        format!("{}/index/node/{node}", self.prefix)
    }

    /// The index key naming the lease that publishes VTEP MAC `mac`.
    pub fn mac_index(&self, mac: MacAddr) -> String {
        format!("{}/index/mac/{mac}", self.prefix)
    }

    /// The index key naming the lease that holds IPv6 subnet `subnet` in a dual-stack
    /// cluster (whose lease keys are IPv4 subnets): what makes an IPv6 subnet as
    /// exclusive as the key subnet.
    pub fn ipv6_index(&self, subnet: Ipv6Net) -> String {
        format!("{}/index/subnet6/{}", self.prefix, subnet_key(subnet))
    }

    /// Every IPv6 subnet index key is under this.
    pub fn ipv6_index_prefix(&self) -> String {
        format!("{}/index/subnet6/", self.prefix)
    }

    /// The subnet of a lease key, if it is one: canonical, `a.b.c.d-len` exactly as the
    /// subnet prints.
    pub fn subnet_of(&self, key: &str) -> Option<IpNet> {
        key.strip_prefix(&self.leases()).and_then(parse_subnet_key)
    }

    /// The lease key an index key's value names.
    pub(super) fn indexed_lease(&self, index: &KeyValue) -> String {
        format!("{}{}", self.leases(), String::from_utf8_lossy(&index.value))
    }
}
