//! The configured plans' quotas, as the SQL that writes them binds them.
//!
//! Guarantee: built once from validated settings, so every plan a workspace can
//! hold has its quotas here.

use std::collections::BTreeMap;

use crate::config::ProvisioningSettings;

/// Each plan's quotas as the parallel arrays the SQL binds.
#[derive(Debug, Default)]
pub(crate) struct Plans(BTreeMap<String, (Vec<String>, Vec<i64>)>);

impl Plans {
    pub(crate) fn new(settings: &ProvisioningSettings) -> Self {
        Self(
            settings
                .plans
                .iter()
                .map(|(plan, quotas)| {
                    let names = quotas.keys().cloned().collect();
                    let values = quotas.values().copied().collect();
                    (plan.clone(), (names, values))
                })
                .collect(),
        )
    }

    /// Quota names and limits of `plan` (empty for an unknown plan, which the
    /// validated settings never produce).
    pub(crate) fn quotas(&self, plan: &str) -> (&[String], &[i64]) {
        match self.0.get(plan) {
            Some((names, values)) => (names, values),
            None => (&[], &[]),
        }
    }
}
