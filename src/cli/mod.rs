//! The command line: one binary, a subcommand per role (DESIGN §1), and the
//! operator commands: send test events ([`send`]), dead letters ([`dlq`]), the
//! processing log ([`events`]), reconcile ([`reconcile`]). (The load tools are a
//! binary of their own, `provisioner-load`, outside the product.)
//!
//! Guarantee: this is a shell. Every command calls the library (`dead_letters`,
//! `store::events`, `reconcile`, `startup`) that the ops console calls too, and only
//! parses arguments and prints the typed results, for a human or as one JSON
//! document; clap, `println!` and progress bars live here and in `src/bin`, nowhere
//! else in the library.

pub mod dlq;
pub mod events;
pub mod reconcile;
pub mod send;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::startup::{self, Application, ServeOptions};

/// Callmine provisioner: Clerk organization webhooks -> Callmine workspaces.
#[derive(Debug, Parser)]
#[command(name = "provisioner", version, about, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// HTTP (webhook intake, read API, health, metrics) and the worker, in one process.
    Serve {
        /// HTTP only; run workers separately with `provisioner worker`. Starts and
        /// queues webhooks even while PostgreSQL is down (migrations follow once it
        /// answers).
        #[arg(long)]
        no_worker: bool,
    },
    /// Worker only: consume queued events and provision them.
    Worker,
    /// Create the database if missing, apply migrations, declare the broker topology, exit.
    Migrate,
    /// Sign a Clerk-shaped event with the configured secret and POST it to a receiver.
    Send(send::SendArgs),
    /// Inspect, replay and purge dead-lettered events.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// The processing log: what happened to each svix id.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Backfill and repair from Clerk's Backend API.
    Reconcile(reconcile::ReconcileArgs),
}

/// Runs the parsed command.
pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { no_worker } => {
            // Installed first: a SIGTERM during start-up is a graceful stop too.
            let signal = startup::shutdown_signal();
            let app = Application::build(settings, ServeOptions { worker: !no_worker }).await?;
            app.run(signal).await
        }
        Command::Worker => {
            // Installed first: a SIGTERM during start-up is a graceful stop too.
            let signal = startup::shutdown_signal();
            startup::run_worker(settings, signal).await
        }
        Command::Migrate => {
            startup::prepare(&settings).await?;
            println!(
                "database ready and migrations applied; broker topology declared ({})",
                settings.broker.exchange
            );
            Ok(())
        }
        Command::Send(args) => send::run(&settings, args).await,
        Command::Dlq(cmd) => dlq::run(&settings, cmd).await,
        Command::Events(cmd) => events::run(&settings, cmd).await,
        Command::Reconcile(args) => reconcile::run(&settings, args).await,
    }
}

/// The whole life of a binary of this crate after its arguments are parsed: load
/// the settings (exit 2 naming the bad one), start logging and say the deprecation
/// notes collected while loading, run `body` on a multi-threaded runtime, and turn
/// its outcome into the exit code, printing a failure as one line of causes.
/// `provisioner` and `provisioner-load` both start here, so they fail alike.
pub fn main_with<F, Fut>(body: F) -> std::process::ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::process::ExitCode;
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init_tracing(&settings.log);
    // Collected while loading, before logging existed; said once, now that it does.
    for note in &settings.deprecations {
        tracing::warn!(note = %note, "deprecated setting");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(body(settings));
    // A connection's I/O thread that is still busy must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined with ": ".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A time as operators read it: RFC 3339 UTC, whole seconds.
pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A plain text table: left-aligned columns, two spaces apart, one line per row.
/// Cells are flattened to one line and the last column is not padded.
pub fn render_table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let clean = |s: &str| s.replace(['\n', '\r', '\t'], " ");
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_flattens_cells() {
        let t = render_table(
            &["A", "BB"],
            vec![
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "two\nlines".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxyz  1\nq    two lines\n");
    }
}
