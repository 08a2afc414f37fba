//! `provisioner events`: the processing log.

use clap::Subcommand;

use crate::config::Settings;

/// `events` subcommands.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List processed events, newest first.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an `events` subcommand.
pub async fn run(settings: &Settings, command: EventsCommand) -> anyhow::Result<()> {
    let _ = (settings, command);
    anyhow::bail!("events is not built yet")
}
