//! `provisioner send`: sign a Clerk-shaped event and POST it to a receiver.

use clap::Args;

use crate::config::Settings;

/// Arguments of `send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Event type, e.g. organization.created.
    pub event_type: Option<String>,
}

/// Runs `send`.
pub async fn run(settings: &Settings, args: SendArgs) -> anyhow::Result<()> {
    let _ = (settings, args);
    anyhow::bail!("send is not built yet")
}
