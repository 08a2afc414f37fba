//! `provisioner-load`: the load tools of the benchmarks (DESIGN §7), a binary of its own
//! so that the product binary and image never ship a second HTTP server, a raw HTTP
//! client or a `teardown` that drops databases and queues.
//!
//! Guarantee: each target sends a bounded number of requests (or runs a bounded time)
//! against addresses on this machine only, and reports throughput and p50/p99/max
//! latency. Built only on the `provisioner` library's public API, with the same
//! configuration (`PROVISIONER_CONFIG`, environment) as the service.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use provisioner::config::Settings;

mod api;
mod e2e;
mod http;
mod intake;

/// Load tools for the benchmarks: signed events against intake, the broker alone, end
/// to end, the read API.
#[derive(Debug, Parser)]
#[command(name = "provisioner-load", version, propagate_version = true)]
struct Cli {
    /// What to load.
    #[command(subcommand)]
    target: LoadTarget,
}

/// Load targets.
#[derive(Debug, Subcommand)]
enum LoadTarget {
    /// The read API's `GET /v1/workspaces/{id}` on a running `serve`, against a
    /// minimal axum + one indexed query server measured in the same run.
    Api(api::ApiLoadArgs),
    /// End to end: signed events through intake, broker and worker into
    /// PostgreSQL; sustained provisioned events/s and provisioning lag.
    E2e(e2e::E2eArgs),
    /// Unique, correctly signed ~1.5 KB organization events POSTed to a receiver.
    Intake(intake::IntakeArgs),
    /// The broker alone: the same events, persistent, mandatory, one confirm awaited
    /// per message, to a scratch quorum queue declared and deleted by the tool.
    Broker(intake::BrokerArgs),
    /// A fake of Clerk's Backend API (N organizations, M members each) on this
    /// machine, for the reconcile backfill benchmark; runs until interrupted.
    FakeClerk(FakeClerkArgs),
    /// Delete the configured scratch topology and database after a benchmark
    /// (refuses unless every name is a `load.` / `provisioner_load` scratch name).
    Teardown(intake::TeardownArgs),
}

async fn run(settings: &Settings, target: LoadTarget) -> anyhow::Result<()> {
    match target {
        LoadTarget::Api(args) => api::run(settings, args).await,
        LoadTarget::E2e(a) => e2e::run(settings, a).await,
        LoadTarget::Intake(a) => intake::run_intake(settings, a).await,
        LoadTarget::Broker(a) => intake::run_broker(settings, a).await,
        LoadTarget::FakeClerk(a) => fake_clerk(a).await,
        LoadTarget::Teardown(a) => intake::run_teardown(settings, a).await,
    }
}

/// Arguments of `fake-clerk`.
#[derive(Debug, clap::Args)]
struct FakeClerkArgs {
    /// Organizations to serve.
    #[arg(long, default_value_t = 10_000)]
    orgs: usize,
    /// Memberships per organization.
    #[arg(long, default_value_t = 5)]
    members: usize,
    /// Address to listen on (this machine only).
    #[arg(long, default_value = "127.0.0.1:18530")]
    listen: std::net::SocketAddr,
    /// The secret key it accepts (`Authorization: Bearer …`).
    #[arg(long, default_value = "sk_test_load_fake_clerk")]
    key: String,
}

/// Serves the library's fake Backend API ([`provisioner::clerk::fake`]) filled
/// with `orgs` organizations of `members` memberships each, until interrupted.
async fn fake_clerk(args: FakeClerkArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "fake-clerk listens on this machine only"
    );
    let fake = provisioner::clerk::fake::FakeClerk::bind(args.listen, &args.key).await?;
    fake.populate(args.orgs, args.members);
    eprintln!(
        "fake Clerk Backend API on {} ({} organizations, {} memberships each)",
        fake.url, args.orgs, args.members
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    provisioner::cli::main_with(|settings| async move { run(&settings, cli.target).await })
}

/// Latency samples and the wall time they were collected in.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    latencies: Vec<Duration>,
    errors: u64,
}

impl Samples {
    /// Records one successful operation.
    pub fn record(&mut self, latency: Duration) {
        self.latencies.push(latency);
    }

    /// Records one failed operation.
    pub fn error(&mut self) {
        self.errors += 1;
    }

    /// Merges another set of samples.
    pub fn merge(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
    }

    /// Summary over `elapsed` wall time.
    pub fn report(&mut self, name: &str, elapsed: Duration) -> Report {
        self.latencies.sort_unstable();
        let pct = |p: f64| -> Duration {
            if self.latencies.is_empty() {
                return Duration::ZERO;
            }
            let idx = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[idx]
        };
        Report {
            name: name.to_owned(),
            ok: self.latencies.len() as u64,
            errors: self.errors,
            elapsed,
            per_second: self.latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50: pct(0.50),
            p99: pct(0.99),
            max: self.latencies.last().copied().unwrap_or_default(),
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// What was measured.
    pub name: String,
    /// Successful operations.
    pub ok: u64,
    /// Failed operations.
    pub errors: u64,
    /// Wall time.
    #[serde(with = "duration_ms")]
    pub elapsed: Duration,
    /// Successful operations per second.
    pub per_second: f64,
    /// Median latency.
    #[serde(with = "duration_ms")]
    pub p50: Duration,
    /// 99th percentile latency.
    #[serde(with = "duration_ms")]
    pub p99: Duration,
    /// Worst latency.
    #[serde(with = "duration_ms")]
    pub max: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<28} {:>8} ok {:>5} err {:>10.1}/s  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
            self.name,
            self.ok,
            self.errors,
            self.per_second,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3,
        )
    }
}

mod duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }
}
