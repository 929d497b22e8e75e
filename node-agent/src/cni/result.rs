//! The CNI result (spec 1.0/1.1 "Success" result): what ADD prints and what `prevResult`
//! carries back to CHECK and DEL.
//!
//! Fields this plugin does not use are kept in `extra` maps, so a `prevResult` that a
//! later plugin of a chain extended (e.g. IPv6 addresses, 1.1 route fields) parses and
//! re-serializes without loss.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteEntry>,
    #[serde(default)]
    pub dns: Dns,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Spec 1.1 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path, for interfaces inside the container; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its on-link prefix length, e.g. `10.244.7.2/24`.
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` of the interface holding the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl CniResult {
    /// The index and entry of the container interface named `ifname` (one with a sandbox).
    pub fn sandbox_interface(&self, ifname: &str) -> Option<(usize, &Interface)> {
        self.interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
    }

    /// The addresses `prevResult` assigns to the interface with index `index`.
    pub fn ips_of(&self, index: usize) -> impl Iterator<Item = &IpConfig> {
        self.ips
            .iter()
            .filter(move |ip| ip.interface == Some(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_with_unknown_fields_round_trips() {
        let text = r#"{
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "ovl1234abcd", "mac": "0a:58:0a:f4:07:02"},
                {"name": "eth0", "mac": "0a:58:0a:f4:07:03", "mtu": 1450,
                 "sandbox": "/run/netns/c1", "socketPath": "/x"}
            ],
            "ips": [
                {"address": "10.244.7.2/24", "gateway": "10.244.7.1", "interface": 1},
                {"address": "fd00::2/64", "interface": 1}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.7.1", "priority": 5}],
            "dns": {"nameservers": ["10.96.0.10"]},
            "somethingNew": true
        }"#;
        let r: CniResult = serde_json::from_str(text).unwrap();
        assert_eq!(r.sandbox_interface("eth0").unwrap().0, 1);
        assert!(r.sandbox_interface("ovl1234abcd").is_none());
        assert_eq!(r.ips_of(1).count(), 2);
        assert_eq!(r.routes[0].extra["priority"], 5);
        let again: CniResult = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
        assert_eq!(
            serde_json::to_value(&again).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
    }

    /// Found by the cni_result fuzz target: serde_json's default float parser is not
    /// exact, so a float in a field this plugin keeps but does not use came back from a
    /// print-and-parse one ULP off ("2.1844674407370954" parsed as 2.184467440737095).
    #[test]
    fn floats_in_unknown_fields_round_trip_exactly() {
        let text = r#"{"cniVersion":"1.1.0","somethingNew":[2.184467440737095516165,2.1844674407370954],
            "interfaces":[{"name":"eth0","weight":0.30000000000000004}]}"#;
        let r: CniResult = serde_json::from_str(text).unwrap();
        assert_eq!(
            r.extra["somethingNew"][0].as_f64(),
            Some(2.1844674407370954)
        );
        assert_eq!(
            r.extra["somethingNew"][1].as_f64(),
            Some(2.1844674407370954)
        );
        let printed = serde_json::to_string(&r).unwrap();
        assert_eq!(
            serde_json::from_str::<CniResult>(&printed).unwrap(),
            r,
            "{printed}"
        );
    }

    #[test]
    fn an_empty_dns_is_still_printed() {
        let r = CniResult {
            cni_version: "1.0.0".into(),
            interfaces: vec![],
            ips: vec![],
            routes: vec![],
            dns: Dns::default(),
            extra: Map::new(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cniVersion":"1.0.0","dns":{}}"#
        );
    }
}
