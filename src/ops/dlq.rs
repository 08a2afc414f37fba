//! `provisioner dlq`: inspect, replay and purge dead letters.

use clap::Subcommand;

use crate::config::Settings;

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `dlq` subcommand.
pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    let _ = (settings, command);
    anyhow::bail!("dlq is not built yet")
}
