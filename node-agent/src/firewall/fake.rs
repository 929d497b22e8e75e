//! A firewall that records the rules asked for instead of installing them (tests only).

use std::sync::Mutex;

use super::{Firewall, FirewallError, FirewallRules};

#[derive(Default)]
pub struct FakeFirewall {
    pub ensured: Mutex<Vec<FirewallRules>>,
    /// Whether the next `ensure` reports a change whatever the rules (a test's way of
    /// saying "someone deleted a rule by hand").
    drift_pending: Mutex<bool>,
}

impl FakeFirewall {
    /// The next `ensure` finds something to repair.
    pub fn drift(&self) {
        *self.drift_pending.lock().expect("firewall") = true;
    }
}

impl Firewall for FakeFirewall {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn ensure(&self, rules: &FirewallRules) -> Result<bool, FirewallError> {
        let mut ensured = self.ensured.lock().expect("firewall");
        let drifted = std::mem::take(&mut *self.drift_pending.lock().expect("firewall"));
        let changed = drifted || ensured.last() != Some(rules);
        ensured.push(rules.clone());
        Ok(changed)
    }

    fn cleanup(&self) -> Result<bool, FirewallError> {
        Ok(!self.ensured.lock().expect("firewall").is_empty())
    }
}
