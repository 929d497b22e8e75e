//! `--firewall none`: the host's firewall is someone else's job. Nothing is read or
//! written; the operator provides the FORWARD accepts (and masquerading, with
//! `--ip-masq`) that the other implementations would install.

use super::{Firewall, FirewallError, FirewallRules};

pub struct NoFirewall;

impl Firewall for NoFirewall {
    fn name(&self) -> &'static str {
        "none"
    }

    fn ensure(&self, _rules: &FirewallRules) -> Result<bool, FirewallError> {
        Ok(false)
    }

    fn cleanup(&self) -> Result<bool, FirewallError> {
        Ok(false)
    }
}
