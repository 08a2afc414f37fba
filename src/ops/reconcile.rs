//! `provisioner reconcile`: backfill and repair from Clerk's Backend API.

use clap::Args;

use crate::config::Settings;

/// Arguments of `reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Only this organization.
    #[arg(long)]
    pub org: Option<String>,
}

/// Runs `reconcile`.
pub async fn run(settings: &Settings, args: ReconcileArgs) -> anyhow::Result<()> {
    let _ = (settings, args);
    anyhow::bail!("reconcile is not built yet")
}
