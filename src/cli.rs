//! The command line: one binary, a subcommand per role (DESIGN §1).

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::ops;
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
    Send(ops::send::SendArgs),
    /// Inspect, replay and purge dead-lettered events.
    #[command(subcommand)]
    Dlq(ops::dlq::DlqCommand),
    /// The processing log: what happened to each svix id.
    #[command(subcommand)]
    Events(ops::events::EventsCommand),
    /// Backfill and repair from Clerk's Backend API.
    Reconcile(ops::reconcile::ReconcileArgs),
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
        Command::Send(args) => ops::send::run(&settings, args).await,
        Command::Dlq(cmd) => ops::dlq::run(&settings, cmd).await,
        Command::Events(cmd) => ops::events::run(&settings, cmd).await,
        Command::Reconcile(args) => ops::reconcile::run(&settings, args).await,
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
