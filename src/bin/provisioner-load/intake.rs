//! `provisioner-load intake` and `provisioner-load broker`: the intake benchmark.
//!
//! `intake` sends unique, correctly signed organization events (~1.5 KB) to a running
//! receiver; `broker` publishes the same bodies with the same confirm discipline
//! (persistent, mandatory, one confirm awaited per message) straight to a scratch
//! quorum queue, so the two rates compare intake against the broker alone. Both only
//! ever touch the addresses they are given and the scratch names they create.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use lapin::ExchangeKind;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use provisioner::clerk::sample::{EVENT_SIZE, organization_event};
use provisioner::config::Settings;
use provisioner::intake::Verifier;

use crate::{Report, Samples};

/// How long and how hard to run.
#[derive(Debug, Clone, Args)]
pub struct LoadShape {
    /// Requests in flight at once (closed loop), or the most in flight with --rate.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Send at this fixed rate (requests per second, open loop) instead of as fast
    /// as the concurrency allows; latency then counts from each request's scheduled
    /// start, so a stall is not hidden by sending less.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop after this many measured requests.
    #[arg(long, conflicts_with = "duration")]
    pub requests: Option<u64>,
    /// Stop after this long (`30s`, `500ms`, `2m`; default 10s unless --requests).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Unmeasured warm-up before the measured run (connections, channels, caches).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Event size in bytes.
    #[arg(long, default_value_t = EVENT_SIZE)]
    pub size: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `provisioner-load intake`.
#[derive(Debug, Args)]
pub struct IntakeArgs {
    /// Webhook URL (default: http://PROVISIONER_LISTEN/webhooks/clerk).
    #[arg(long)]
    pub url: Option<String>,
    /// Load shape.
    #[command(flatten)]
    pub shape: LoadShape,
}

/// Arguments of `provisioner-load broker`.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Confirm channels to publish on (default: one per concurrent publisher, one
    /// message in flight each, as intake's publisher does).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Load shape.
    #[command(flatten)]
    pub shape: LoadShape,
}

/// Parses `30s`, `500ms`, `2m` or plain seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = match raw.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => raw.split_at(i),
        None => (raw, "s"),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{raw}` is not a duration like 30s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{raw}`: unit must be ms, s or m")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{raw}` is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One measured run, as printed.
#[derive(Debug, serde::Serialize)]
struct Output<'a> {
    target: &'a str,
    concurrency: usize,
    rate: Option<f64>,
    size_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<usize>,
    #[serde(flatten)]
    report: Report,
}

fn print(output: &Output<'_>, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(output)?);
    } else {
        let rate = output
            .rate
            .map(|r| format!(" rate {r:.0}/s"))
            .unwrap_or_default();
        let channels = output
            .channels
            .map(|c| format!(" channels {c}"))
            .unwrap_or_default();
        println!(
            "{}  (concurrency {}{rate}{channels}, {} B events)",
            output.report, output.concurrency, output.size_bytes
        );
    }
    Ok(())
}

/// A unique tag for this run, so event ids never repeat across runs.
fn run_tag() -> String {
    format!(
        "{:x}{:04x}",
        std::time::UNIX_EPOCH
            .elapsed()
            .unwrap_or_default()
            .as_secs(),
        rand::random::<u16>()
    )
}

/// Drives `op` in the given shape: a warm-up, then the measured phase.
async fn drive<F, Fut>(shape: &LoadShape, op: F) -> anyhow::Result<(Samples, Duration)>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    if shape.concurrency == 0 {
        anyhow::bail!("--concurrency must be positive");
    }
    if let Some(rate) = shape.rate
        && !(rate > 0.0 && rate.is_finite())
    {
        anyhow::bail!("--rate must be positive");
    }
    let op = Arc::new(op);
    let seq = Arc::new(AtomicU64::new(0));
    if !shape.warmup.is_zero() {
        phase(shape, op.clone(), seq.clone(), None, Some(shape.warmup)).await;
    }
    let duration = match (shape.requests, shape.duration) {
        (None, None) => Some(Duration::from_secs(10)),
        (_, d) => d,
    };
    let started = Instant::now();
    let samples = phase(shape, op, seq, shape.requests, duration).await;
    Ok((samples, started.elapsed()))
}

async fn phase<F, Fut>(
    shape: &LoadShape,
    op: Arc<F>,
    seq: Arc<AtomicU64>,
    requests: Option<u64>,
    duration: Option<Duration>,
) -> Samples
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let deadline = duration.map(|d| Instant::now() + d);
    let issued = Arc::new(AtomicU64::new(0));
    // Claims the next request slot, or None when the phase is over.
    let claim = {
        let issued = issued.clone();
        move || -> bool {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            match requests {
                Some(n) => issued.fetch_add(1, Ordering::Relaxed) < n,
                None => true,
            }
        }
    };
    match shape.rate {
        None => {
            // Closed loop: `concurrency` workers, each one request at a time.
            let workers = (0..shape.concurrency).map(|_| {
                let op = op.clone();
                let seq = seq.clone();
                let claim = claim.clone();
                tokio::spawn(async move {
                    let mut samples = Samples::default();
                    while claim() {
                        let n = seq.fetch_add(1, Ordering::Relaxed);
                        let start = Instant::now();
                        if op(n).await {
                            samples.record(start.elapsed());
                        } else {
                            samples.error();
                        }
                    }
                    samples
                })
            });
            let mut all = Samples::default();
            for w in futures_util::future::join_all(workers).await {
                all.merge(w.unwrap_or_default());
            }
            all
        }
        Some(rate) => {
            // Open loop: one request per tick; latency from the scheduled start.
            let permits = Arc::new(tokio::sync::Semaphore::new(shape.concurrency));
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = Vec::new();
            loop {
                let scheduled = ticker.tick().await.into_std();
                if !claim() {
                    break;
                }
                let permit = permits.clone().acquire_owned().await.expect("never closed");
                let op = op.clone();
                let n = seq.fetch_add(1, Ordering::Relaxed);
                tasks.push(tokio::spawn(async move {
                    let ok = op(n).await;
                    drop(permit);
                    (ok, scheduled.elapsed())
                }));
            }
            let mut all = Samples::default();
            for t in futures_util::future::join_all(tasks).await {
                match t {
                    Ok((true, latency)) => all.record(latency),
                    _ => all.error(),
                }
            }
            all
        }
    }
}

/// `provisioner-load intake`: signed events POSTed to a running receiver.
pub async fn run_intake(settings: &Settings, args: IntakeArgs) -> anyhow::Result<()> {
    let url = args
        .url
        .unwrap_or_else(|| format!("http://{}/webhooks/clerk", settings.http.listen));
    let verifier = Arc::new(Verifier::new(&settings.clerk.webhook_secrets));
    // Fail early and clearly when nothing listens there.
    reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let client = Arc::new(crate::http::PostClient::new(&url)?);
    let tag = run_tag();
    let size = args.shape.size;
    let (mut samples, elapsed) = drive(&args.shape, move |n| {
        let client = client.clone();
        let verifier = verifier.clone();
        let body = organization_event(&tag, n, size);
        let id = format!("msg_load_{tag}_{n}");
        async move {
            let ts = std::time::UNIX_EPOCH
                .elapsed()
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let Some(signature) = verifier.sign(&id, ts, &body) else {
                return false;
            };
            let ts = ts.to_string();
            let headers = [
                ("svix-id", id.as_str()),
                ("svix-timestamp", ts.as_str()),
                ("svix-signature", signature.as_str()),
            ];
            matches!(client.post(&headers, &body).await, Ok(200))
        }
    })
    .await?;
    let output = Output {
        target: "intake",
        concurrency: args.shape.concurrency,
        rate: args.shape.rate,
        size_bytes: size,
        channels: None,
        report: samples.report("intake", elapsed),
    };
    print(&output, args.shape.json)
}

/// `provisioner-load broker`: the same events published straight to a scratch quorum queue with
/// intake's confirm discipline; the scratch exchange and queue are deleted after.
pub async fn run_broker(settings: &Settings, args: BrokerArgs) -> anyhow::Result<()> {
    let tag = run_tag();
    let exchange = format!("load.{tag}.exchange");
    let queue = format!("load.{tag}.queue");
    let conn = provisioner::broker::connect(&settings.broker.url, "provisioner-load")
        .await
        .with_context(|| format!("cannot reach RabbitMQ at {}", settings.broker.url))?;
    let admin = conn.create_channel().await?;
    admin
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    // The work queue's arguments (DESIGN §4), plus an expiry in case this tool is
    // killed before it deletes the queue.
    let mut qargs = FieldTable::default();
    for (k, v) in [
        ("x-queue-type", AMQPValue::LongString("quorum".into())),
        (
            "x-delivery-limit",
            AMQPValue::LongInt(settings.broker.delivery_limit as i32),
        ),
        (
            "x-dead-letter-exchange",
            AMQPValue::LongString(format!("load.{tag}.dlx").as_str().into()),
        ),
        (
            "x-dead-letter-strategy",
            AMQPValue::LongString("at-least-once".into()),
        ),
        ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ("x-expires", AMQPValue::LongLongInt(15 * 60 * 1000)),
    ] {
        qargs.insert(k.into(), v);
    }
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            qargs,
        )
        .await?;
    admin
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let result = async {
        let n_channels = args
            .channels
            .unwrap_or(args.shape.concurrency)
            .clamp(1, args.shape.concurrency.max(1));
        let mut channels = Vec::with_capacity(n_channels);
        for _ in 0..n_channels {
            channels.push(provisioner::broker::confirm_channel(&conn).await?);
        }
        let channels = Arc::new(channels);
        let size = args.shape.size;
        let exchange2 = exchange.clone();
        let tag2 = tag.clone();
        let (mut samples, elapsed) = drive(&args.shape, move |n| {
            let channel = channels[(n as usize) % channels.len()].clone();
            let body = organization_event(&tag2, n, size);
            let id = format!("msg_load_{tag2}_{n}");
            let exchange = exchange2.clone();
            async move {
                // The same properties and options as intake's publisher.
                let props = provisioner::broker::event_properties(&id, "organization.created")
                    .with_timestamp(provisioner::broker::now_timestamp());
                provisioner::broker::publish_confirmed(
                    &channel,
                    &exchange,
                    "organization.created",
                    &body,
                    props,
                    Duration::from_secs(5),
                )
                .await
                .is_ok()
            }
        })
        .await?;
        let output = Output {
            target: "broker",
            concurrency: args.shape.concurrency,
            rate: args.shape.rate,
            size_bytes: size,
            channels: Some(n_channels),
            report: samples.report("broker", elapsed),
        };
        print(&output, args.shape.json)
    }
    .await;

    // Clean up whatever happened above.
    let _ = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = admin
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "load done".into()).await;
    result
}

/// Arguments of `provisioner-load teardown`.
#[derive(Debug, Args)]
pub struct TeardownArgs {
    /// Really delete (the configured names must be scratch names, see below).
    #[arg(long)]
    pub yes: bool,
}

/// The prefixes `provisioner-load teardown` insists on, so it can never delete real queues or a
/// real database: every broker name must start with `load.` and the database name
/// with `provisioner_load`.
pub const SCRATCH_BROKER_PREFIX: &str = "load.";
/// See [`SCRATCH_BROKER_PREFIX`].
pub const SCRATCH_DATABASE_PREFIX: &str = "provisioner_load";

/// `provisioner-load teardown`: deletes the configured (scratch) topology and database after a
/// benchmark run of `serve` on scratch names.
pub async fn run_teardown(settings: &Settings, args: TeardownArgs) -> anyhow::Result<()> {
    let topology = provisioner::broker::Topology::new(&settings.broker, &settings.worker);
    let database = url::Url::parse(settings.database.url.expose())
        .ok()
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .unwrap_or_default();
    let mut broker_names = topology.queue_names();
    broker_names.push(topology.exchange.clone());
    broker_names.push(topology.dead_letter_exchange.clone());
    if let Some(name) = broker_names
        .iter()
        .find(|n| !n.starts_with(SCRATCH_BROKER_PREFIX))
    {
        anyhow::bail!(
            "refusing to tear down `{name}`: only names starting with `{SCRATCH_BROKER_PREFIX}` are scratch names"
        );
    }
    if !database.starts_with(SCRATCH_DATABASE_PREFIX) {
        anyhow::bail!(
            "refusing to drop database `{database}`: only names starting with `{SCRATCH_DATABASE_PREFIX}` are scratch databases"
        );
    }
    if !args.yes {
        anyhow::bail!(
            "would delete queues {:?}, exchanges `{}` and `{}`, database `{database}`; add --yes",
            topology.queue_names(),
            topology.exchange,
            topology.dead_letter_exchange
        );
    }
    let conn = provisioner::broker::connect(&settings.broker.url, "provisioner-load-teardown")
        .await
        .with_context(|| format!("cannot reach RabbitMQ at {}", settings.broker.url))?;
    let ch = conn.create_channel().await?;
    for queue in topology.queue_names() {
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("deleting queue {queue}"))?;
    }
    for exchange in [&topology.exchange, &topology.dead_letter_exchange] {
        ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .with_context(|| format!("deleting exchange {exchange}"))?;
    }
    let _ = conn.close(200, "teardown done".into()).await;

    let admin = provisioner::db::options(&settings.database)?.database("postgres");
    let mut pg = sqlx::ConnectOptions::connect(&admin)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {}", settings.database.url))?;
    let sql = format!(
        "drop database if exists \"{}\" with (force)",
        database.replace('"', "\"\"")
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut pg)
        .await
        .with_context(|| format!("dropping database {database}"))?;
    println!(
        "deleted {} queues, 2 exchanges and database {database}",
        topology.queue_names().len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }
}
