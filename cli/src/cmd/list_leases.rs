//! `overlayctl leases`: every lease, sorted by subnet.

use std::time::SystemTime;

use anyhow::anyhow;
use overlay_core::lease::from_unix_millis;
use overlay_core::Lease;
use overlay_proto::v1;

use crate::client::{self, ControllerUrls};
use crate::output::{self, lease_json, relative_expiry, Format, Table};

/// A lease with its expiry as the controller looked it up (none for reservations).
pub type ListedLease = (Lease, Option<SystemTime>);

pub async fn run(controllers: &ControllerUrls, format: Format) -> anyhow::Result<()> {
    let ctl = client::connect(controllers).await?;
    let response = ctl
        .call(ctl.agent().list_leases(v1::ListLeasesRequest {}))
        .await?;
    let leases = from_proto(&response.leases)?;
    output::print(&render_leases(leases, format, SystemTime::now()))?;
    Ok(())
}

pub fn from_proto(leases: &[v1::Lease]) -> anyhow::Result<Vec<ListedLease>> {
    leases
        .iter()
        .map(|l| {
            let lease = overlay_proto::lease_from_proto(l)
                .map_err(|e| anyhow!("the controller sent an invalid lease: {e}"))?;
            Ok((lease, l.expires_at_ms.map(from_unix_millis)))
        })
        .collect()
}

pub fn render_leases(mut leases: Vec<ListedLease>, format: Format, now: SystemTime) -> String {
    leases.sort_by_key(|(l, _)| l.subnet);
    match format {
        Format::Json => {
            let items: Vec<_> = leases
                .iter()
                .map(|(lease, expires)| lease_json(lease, *expires))
                .collect();
            output::json_pretty(&items)
        }
        Format::Table => {
            let mut t = Table::with_header(&[
                "subnet",
                "node",
                "public ip",
                "backend",
                "vtep mac",
                "reserved",
                "expires",
            ]);
            for (lease, expires) in &leases {
                let r = &lease.record;
                let expires = if r.reserved { None } else { *expires };
                t.row([
                    lease.subnets_text(),
                    r.node.clone(),
                    lease.public_text(),
                    r.backend.to_string(),
                    r.backend_data
                        .vtep_mac
                        .map_or("-".to_string(), |m| m.to_string()),
                    if r.reserved { "yes" } else { "no" }.to_string(),
                    relative_expiry(expires, now),
                ]);
            }
            t.render()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::tests::lease;
    use std::time::Duration;

    #[test]
    fn table_sorted_by_subnet_with_relative_expiry() {
        let now = from_unix_millis(1_700_000_100_000);
        let leases = vec![
            (
                lease("10.244.10.0/24", "node-10", false),
                Some(now + Duration::from_secs(24 * 3600 - 30)),
            ),
            (lease("10.244.2.0/24", "reserved-node", true), None),
            (
                lease("10.244.7.0/24", "n7", false),
                Some(now + Duration::from_secs(90)),
            ),
        ];
        assert_eq!(
            render_leases(leases, Format::Table, now),
            "SUBNET          NODE           PUBLIC IP   BACKEND  VTEP MAC           RESERVED  EXPIRES\n\
             10.244.2.0/24   reserved-node  192.0.2.11  vxlan    -                  yes       -\n\
             10.244.7.0/24   n7             192.0.2.11  vxlan    0a:58:0a:f4:07:00  no        in 1m30s\n\
             10.244.10.0/24  node-10        192.0.2.11  vxlan    0a:58:0a:f4:07:00  no        in 23h59m\n"
        );
    }

    #[test]
    fn json_is_an_array_of_lease_objects() {
        let now = from_unix_millis(1_700_000_100_000);
        let leases = vec![
            (
                lease("10.244.7.0/24", "n7", false),
                Some(from_unix_millis(1_700_086_400_000)),
            ),
            (lease("10.244.2.0/24", "r", true), None),
        ];
        let v: serde_json::Value =
            serde_json::from_str(&render_leases(leases, Format::Json, now)).unwrap();
        let items = v.as_array().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["subnet"], "10.244.2.0/24");
        assert_eq!(items[0]["expires_at"], serde_json::Value::Null);
        assert_eq!(items[1]["expires_at"], "2023-11-15T22:13:20.000Z");
        assert_eq!(render_leases(vec![], Format::Json, now), "[]\n");
    }

    #[test]
    fn invalid_leases_from_the_controller_are_an_error() {
        let mut bad = overlay_proto::lease_to_proto(&lease("10.244.7.0/24", "n7", false), None);
        bad.subnet = "nonsense".into();
        let e = from_proto(&[bad]).unwrap_err().to_string();
        assert!(
            e.starts_with("the controller sent an invalid lease: subnet"),
            "{e}"
        );
    }
}
