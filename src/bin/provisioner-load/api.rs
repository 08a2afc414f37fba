//! `provisioner-load api`: the read API's hottest route against this machine's
//! limit for it.
//!
//! Measures `GET /v1/workspaces/{id}` (with the bearer token) on a running `serve`
//! at a fixed number of concurrent keep-alive connections, then — in the same run,
//! with the same client, concurrency and duration — a minimal axum server started
//! here on its own runtime whose one route runs one indexed `select` on the same
//! database (the "axum + one indexed query" limit), and reports both and their
//! ratio. The same server has a second route that runs the read API's own statement
//! (`store::workspace`) and answers its body, with no authentication, middleware or
//! connection limits: the "same work" floor, which splits the gap into what the
//! answer itself costs (floor ÷ limit) and what the service adds around it
//! (API ÷ floor). Guarantee: it only reads, is bounded in time and request count,
//! and touches only the addresses it is given and a loopback port of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use clap::Args;
use provisioner::config::Settings;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Report, Samples};

/// Arguments of `provisioner-load api`.
#[derive(Debug, Args)]
pub struct ApiLoadArgs {
    /// Base URL of a running `provisioner serve`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Workspace id to read; it must be provisioned in the configured database.
    #[arg(long)]
    pub workspace: String,
    /// Concurrent connections (each sends its next request when the last answered).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds per target.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Stop a target earlier after this many requests.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured seconds per target before measuring (connections, caches, plans).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Send `X-Acting-User` (adds the membership check to each request).
    #[arg(long)]
    pub acting_user: Option<String>,
    /// Measured rounds per target, alternating API and baseline; the median round
    /// of each is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measure the read API only, without the baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Pid of the `serve` process, to report its CPU time per request (Linux
    /// `/proc`): a figure a busy neighbour on the machine does not move.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One measured round of one target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Round {
    /// Throughput and latency.
    #[serde(flatten)]
    pub report: Report,
    /// CPU time of the HTTP server per successful request (µs), when known.
    pub server_cpu_us_per_request: Option<f64>,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.report)?;
        if let Some(us) = self.server_cpu_us_per_request {
            write!(f, "  server cpu {us:>6.1} µs/req")?;
        }
        Ok(())
    }
}

/// Both measurements and their ratio.
#[derive(Debug, serde::Serialize)]
pub struct ApiLoadResult {
    /// The read API's `GET /v1/workspaces/{id}`: the median round.
    pub api: Round,
    /// The minimal axum + one indexed query server: the median round.
    pub baseline: Option<Round>,
    /// Every round of the read API.
    pub api_rounds: Vec<Round>,
    /// Every round of the baseline.
    pub baseline_rounds: Vec<Round>,
    /// axum + the read API's own statement and body: the median round.
    pub same_work: Option<Round>,
    /// Every round of the same-work floor.
    pub same_work_rounds: Vec<Round>,
    /// `api.per_second / same_work.per_second` (medians): what the service adds.
    pub same_work_ratio: Option<f64>,
    /// `api.per_second / baseline.per_second` (medians).
    pub ratio: Option<f64>,
    /// Concurrent connections used for both.
    pub concurrency: usize,
}

/// Runs `provisioner-load api`.
pub async fn run(settings: &Settings, args: ApiLoadArgs) -> anyhow::Result<()> {
    let token = settings
        .api
        .tokens
        .first()
        .context("no API token configured (PROVISIONER_API_TOKENS)")?
        .clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = args.url.trim_end_matches('/');
    let api_url = format!("{base}/v1/workspaces/{}", args.workspace);

    // Fail fast, with the reason, before loading anything.
    let mut probe = client.get(&api_url).bearer_auth(token.expose());
    if let Some(user) = &args.acting_user {
        probe = probe.header(provisioner::http::api::auth::ACTING_USER, user);
    }
    let res = probe
        .send()
        .await
        .with_context(|| format!("cannot reach {api_url}"))?;
    anyhow::ensure!(
        res.status().is_success(),
        "GET {api_url} answered {}: {}",
        res.status(),
        res.text().await.unwrap_or_default()
    );

    let plan = Plan {
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.duration),
        warmup: Duration::from_secs(args.warmup),
        requests: args.requests,
    };
    let baseline_server = if args.no_baseline {
        None
    } else {
        let server = Baseline::start(settings)
            .await
            .context("starting the baseline server")?;
        let url = format!("http://{}/w/{}", server.addr, args.workspace);
        let same_url = format!("http://{}/same/{}", server.addr, args.workspace);
        for url in [&url, &same_url] {
            let mut probe = client.get(url);
            if let Some(user) = &args.acting_user {
                probe = probe.header(provisioner::http::api::auth::ACTING_USER, user);
            }
            let res = probe.send().await?;
            anyhow::ensure!(
                res.status().is_success(),
                "baseline GET {url} answered {}",
                res.status()
            );
        }
        Some((server, url, same_url))
    };

    // Rounds alternate between the targets, so a neighbour's burst on this shared
    // machine lands on all of them rather than skewing a ratio. Every target gets
    // the same requests, token and acting user included, so the client does the
    // same work; the baseline routes ignore the token.
    let server_pid = args.server_pid;
    let serve_cpu = move || server_pid.and_then(|pid| process_cpu(&format!("/proc/{pid}")));
    /// Name, URL, the server's CPU time so far, and the rounds measured.
    type Target<'a> = (
        &'a str,
        &'a str,
        &'a dyn Fn() -> Option<Duration>,
        Vec<Round>,
    );
    let mut targets: Vec<Target> =
        vec![("read api GET workspace", &api_url, &serve_cpu, Vec::new())];
    if let Some((_, url, same_url)) = &baseline_server {
        targets.push(("axum + 1 indexed select", url, &baseline_cpu, Vec::new()));
        targets.push((
            "axum + the API's statement",
            same_url,
            &baseline_cpu,
            Vec::new(),
        ));
    }
    for _ in 0..args.rounds.max(1) {
        for (name, url, cpu, rounds) in &mut targets {
            let report = load(
                &client,
                &plan,
                name,
                url,
                Some(token.expose()),
                args.acting_user.as_deref(),
                *cpu,
            )
            .await;
            if !args.json {
                println!("{report}");
            }
            rounds.push(report);
        }
    }
    let mut rounds = targets.into_iter().map(|(_, _, _, rounds)| rounds);
    let api_rounds = rounds.next().unwrap_or_default();
    let baseline_rounds = rounds.next().unwrap_or_default();
    let same_work_rounds = rounds.next().unwrap_or_default();
    if let Some((server, _, _)) = baseline_server {
        server.stop();
    }

    let api = median(&api_rounds);
    let baseline = (!baseline_rounds.is_empty()).then(|| median(&baseline_rounds));
    let api_errors: u64 = api_rounds.iter().map(|r| r.report.errors).sum();
    let same_work = (!same_work_rounds.is_empty()).then(|| median(&same_work_rounds));
    let ratio_to = |b: &Round| api.report.per_second / b.report.per_second.max(1e-9);
    let ratio = baseline.as_ref().map(ratio_to);
    let same_work_ratio = same_work.as_ref().map(ratio_to);
    if args.json {
        let result = ApiLoadResult {
            api,
            baseline,
            ratio,
            concurrency: args.concurrency,
            api_rounds,
            baseline_rounds,
            same_work,
            same_work_rounds,
            same_work_ratio,
        };
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else if let (Some(ratio), Some(b)) = (ratio, &baseline) {
        println!(
            "median of {} rounds: read API {:.0}/s p99 {:.2} ms; axum + 1 query limit {:.0}/s p99 {:.2} ms; \
             ratio {:.1} % at {} connections",
            api_rounds.len(),
            api.report.per_second,
            api.report.p99.as_secs_f64() * 1e3,
            b.report.per_second,
            b.report.p99.as_secs_f64() * 1e3,
            ratio * 100.0,
            args.concurrency,
        );
        if let (Some(a), Some(b)) = (api.server_cpu_us_per_request, b.server_cpu_us_per_request) {
            println!(
                "server CPU per request: read API {a:.1} µs, baseline {b:.1} µs (baseline/API {:.1} %)",
                b / a * 100.0
            );
        }
        if let (Some(same_ratio), Some(s)) = (same_work_ratio, &same_work) {
            println!(
                "same work: axum + the API's statement {:.0}/s p99 {:.2} ms, server CPU {} µs; \
                 its share of the limit {:.1} %, the read API's share of it {:.1} %",
                s.report.per_second,
                s.report.p99.as_secs_f64() * 1e3,
                s.server_cpu_us_per_request
                    .map_or_else(|| "?".to_owned(), |us| format!("{us:.1}")),
                s.report.per_second / b.report.per_second.max(1e-9) * 100.0,
                same_ratio * 100.0,
            );
        }
    }
    if api_errors > 0 {
        anyhow::bail!("{api_errors} requests to the read API failed");
    }
    Ok(())
}

/// The round with the median throughput (the higher middle one of an even count).
fn median(rounds: &[Round]) -> Round {
    let mut sorted: Vec<&Round> = rounds.iter().collect();
    sorted.sort_by(|a, b| a.report.per_second.total_cmp(&b.report.per_second));
    sorted[sorted.len() / 2].clone()
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`; 100 on Linux).
const CLOCK_TICKS: f64 = 100.0;

/// User + system CPU time of a process or thread from its `/proc/…/stat`.
fn process_cpu(dir: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // Fields after the parenthesised command name (which may hold spaces):
    // state is field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) / CLOCK_TICKS))
}

/// CPU time of this process's baseline-server threads (named `baseline-…`).
fn baseline_cpu() -> Option<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.starts_with("baseline") {
            total += process_cpu(&dir.to_string_lossy())?;
        }
    }
    Some(total)
}

/// How long and how hard to load one target.
#[derive(Debug, Clone)]
struct Plan {
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
    requests: Option<u64>,
}

/// Warms up, then measures `url` with `plan.concurrency` connections.
async fn load(
    client: &reqwest::Client,
    plan: &Plan,
    name: &str,
    url: &str,
    token: Option<&str>,
    acting_user: Option<&str>,
    server_cpu: &dyn Fn() -> Option<Duration>,
) -> Round {
    if !plan.warmup.is_zero() {
        let _ = round(client, plan, plan.warmup, None, url, token, acting_user).await;
    }
    let cpu_before = server_cpu();
    let (mut samples, elapsed) = round(
        client,
        plan,
        plan.duration,
        plan.requests,
        url,
        token,
        acting_user,
    )
    .await;
    let cpu = cpu_before
        .zip(server_cpu())
        .map(|(a, b)| b.saturating_sub(a));
    let report = samples.report(name, elapsed);
    let server_cpu_us_per_request = cpu
        .filter(|_| report.ok > 0)
        .map(|cpu| cpu.as_secs_f64() * 1e6 / report.ok as f64);
    Round {
        report,
        server_cpu_us_per_request,
    }
}

/// One timed round: every connection loops until the time or request budget ends.
async fn round(
    client: &reqwest::Client,
    plan: &Plan,
    duration: Duration,
    requests: Option<u64>,
    url: &str,
    token: Option<&str>,
    acting_user: Option<&str>,
) -> (Samples, Duration) {
    let started = Instant::now();
    let deadline = started + duration;
    let budget = Arc::new(AtomicU64::new(requests.unwrap_or(u64::MAX)));
    let mut tasks = Vec::with_capacity(plan.concurrency);
    for _ in 0..plan.concurrency {
        let client = client.clone();
        let url = url.to_owned();
        let token = token.map(str::to_owned);
        let acting_user = acting_user.map(str::to_owned);
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            while Instant::now() < deadline {
                // Take one request from the shared budget, or stop.
                if budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let mut req = client.get(&url);
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                if let Some(u) = &acting_user {
                    req = req.header(provisioner::http::api::auth::ACTING_USER, u);
                }
                let t0 = Instant::now();
                let ok = match req.send().await {
                    Ok(res) if res.status() == StatusCode::OK => res.bytes().await.is_ok(),
                    _ => false,
                };
                if ok {
                    samples.record(t0.elapsed());
                } else {
                    samples.error();
                }
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for task in tasks {
        if let Ok(s) = task.await {
            all.merge(s);
        }
    }
    (all, started.elapsed())
}

/// The minimal server: axum, one route, one indexed `select` on the same database,
/// on a runtime of its own threads (as `serve` has its own process), so it does not
/// share the load client's scheduler.
struct Baseline {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(serde::Serialize, sqlx::FromRow)]
struct BaselineRow {
    id: String,
    name: Option<String>,
    slug: Option<String>,
    status: String,
    plan: String,
}

async fn baseline_route(
    State(db): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<BaselineRow>, StatusCode> {
    // Primary-key lookup: the cheapest indexed query on the same table.
    sqlx::query_as::<_, BaselineRow>(
        "select id, name, slug, status, plan from workspaces where id = $1",
    )
    .bind(id)
    .fetch_optional(&db)
    .await
    .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?
    .map(Json)
    .ok_or(StatusCode::NOT_FOUND)
}

/// The read API's own statement and body for `{id}`, as `X-Acting-User` (if sent)
/// may see it: the work of `GET /v1/workspaces/{id}` without the service around it.
async fn same_work_route(
    State(db): State<PgPool>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Json<provisioner::store::model::Workspace>, StatusCode> {
    let acting = headers
        .get(provisioner::http::api::auth::ACTING_USER)
        .and_then(|v| v.to_str().ok());
    match provisioner::store::workspace(&db, &id, acting).await {
        Ok(Some((workspace, access))) if acting.is_none() || access.role.is_some() => {
            Ok(Json(workspace))
        }
        Ok(_) => Err(StatusCode::NOT_FOUND),
        Err(_) => Err(StatusCode::SERVICE_UNAVAILABLE),
    }
}

impl Baseline {
    async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let db_settings = settings.database.clone();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("baseline".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("baseline-worker")
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let started = async {
                        // Same pool settings as `serve`, so both have the same
                        // number of database connections to work with.
                        let db = provisioner::db::pool(&db_settings)?;
                        let listener = TcpListener::bind("127.0.0.1:0").await?;
                        anyhow::Ok((db, listener))
                    }
                    .await;
                    let (db, listener) = match started {
                        Ok(v) => v,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let addr = listener.local_addr();
                    let app = axum::Router::new()
                        .route("/w/{id}", get(baseline_route))
                        .route("/same/{id}", get(same_work_route))
                        .with_state(db.clone());
                    let _ = tx.send(addr.map_err(anyhow::Error::from));
                    // No graceful drain: the load client keeps idle keep-alive
                    // connections open, and there is nothing to finish.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = token.cancelled() => {}
                    }
                    db.close().await;
                });
            })?;
        let addr = rx.await.context("baseline thread died")??;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Baseline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Baseline")
            .field("addr", &self.addr)
            .finish()
    }
}
