//! A webhook sender that behaves like Svix, for tests that stream events into the
//! running service while they break something.
//!
//! Like Svix: each message is signed afresh for every attempt (new
//! `svix-timestamp`, same `svix-id`); any answer but a 2xx, a connection error and
//! no answer within [`SVIX_TIMEOUT`] are failures, retried with backoff; a message is
//! sometimes delivered again after it succeeded (Svix delivers at least once). Unlike
//! Svix, the schedule is compressed (0.25 s doubling to 4 s with jitter, instead of
//! 5 s, 5 min, 30 min, …) and a message is given up after [`SenderConfig::give_up`].
//!
//! Guarantee: the report records every attempt of every message, so a test can say
//! which messages got a 2xx (and must be provisioned) and tally the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::task::JoinSet;

use super::history::Webhook;

/// How long Svix waits for an answer before it counts the attempt as failed.
pub const SVIX_TIMEOUT: Duration = Duration::from_secs(15);

/// How the stream is sent.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// `http://host:port/webhooks/clerk`.
    pub url: String,
    /// The `whsec_` secret messages are signed with.
    pub secret: String,
    /// Time between the first attempts of two consecutive messages.
    pub interval: Duration,
    /// Every `duplicate_every`-th message is delivered again after its 2xx (0: never).
    pub duplicate_every: usize,
    /// A message still failing this long after its first attempt is given up.
    pub give_up: Duration,
}

impl SenderConfig {
    /// A steady stream to `base` (`http://127.0.0.1:PORT`), one message every 50 ms,
    /// every tenth delivered twice, given up after 100 s.
    pub fn new(base: &str, secret: &str) -> Self {
        Self {
            url: format!("{base}/webhooks/clerk"),
            secret: secret.to_owned(),
            interval: Duration::from_millis(50),
            duplicate_every: 10,
            give_up: Duration::from_secs(100),
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// An HTTP answer with this status.
    Status(u16),
    /// No connection, or the connection broke before an answer.
    ConnectionError,
    /// No answer within [`SVIX_TIMEOUT`].
    Timeout,
}

impl Attempt {
    /// A 2xx answer.
    pub fn ok(&self) -> bool {
        matches!(self, Attempt::Status(s) if (200..300).contains(s))
    }
}

/// One delivery of a message (a duplicate delivery is a second one) and its
/// attempts, each with when it started and how long it took.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message's svix id.
    pub svix_id: String,
    /// Whether this is a repeat delivery of a message that already got its 2xx.
    pub duplicate: bool,
    /// Every attempt: when it started, how long it took, how it ended.
    pub attempts: Vec<(Instant, Duration, Attempt)>,
}

impl Delivery {
    /// Whether the last attempt got a 2xx.
    pub fn succeeded(&self) -> bool {
        self.attempts.last().is_some_and(|a| a.2.ok())
    }
}

/// Live counters, readable while the stream runs (a test acts on them mid-stream).
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages whose first attempt has started.
    pub started: AtomicUsize,
    /// Messages that got their 2xx.
    pub succeeded: AtomicUsize,
    /// Attempts that failed (non-2xx, connection error, timeout).
    pub failed_attempts: AtomicUsize,
}

/// Everything the sender did.
#[derive(Debug, Default)]
pub struct Report {
    /// Messages in the stream.
    pub messages: usize,
    /// Every delivery, first ones and duplicates.
    pub deliveries: Vec<Delivery>,
}

impl Report {
    /// Svix ids that got a 2xx (at least once).
    pub fn acknowledged(&self) -> std::collections::BTreeSet<String> {
        self.deliveries
            .iter()
            .filter(|d| d.succeeded())
            .map(|d| d.svix_id.clone())
            .collect()
    }

    /// Svix ids of messages given up (never a 2xx).
    pub fn given_up(&self) -> Vec<String> {
        let ok = self.acknowledged();
        self.deliveries
            .iter()
            .filter(|d| !d.duplicate && !ok.contains(&d.svix_id))
            .map(|d| d.svix_id.clone())
            .collect()
    }

    /// Attempts after the first of each delivery: the sender's retries.
    pub fn retries(&self) -> usize {
        self.deliveries
            .iter()
            .map(|d| d.attempts.len().saturating_sub(1))
            .sum()
    }

    /// Every attempt of every delivery.
    pub fn attempts(&self) -> impl Iterator<Item = &(Instant, Duration, Attempt)> {
        self.deliveries.iter().flat_map(|d| d.attempts.iter())
    }

    /// Attempts that ended like `pred`.
    pub fn count(&self, pred: impl Fn(&Attempt) -> bool) -> usize {
        self.attempts().filter(|a| pred(&a.2)).count()
    }

    /// Duplicate deliveries sent.
    pub fn duplicates(&self) -> usize {
        self.deliveries.iter().filter(|d| d.duplicate).count()
    }

    /// A one-line summary of the sender's side.
    pub fn summary(&self) -> String {
        format!(
            "sent {}, 2xx {}, retried by the sender {} (non-2xx {}, connection errors {}, timeouts {}), \
             duplicate deliveries {}",
            self.messages,
            self.acknowledged().len(),
            self.retries(),
            self.count(|a| matches!(a, Attempt::Status(_)) && !a.ok()),
            self.count(|a| *a == Attempt::ConnectionError),
            self.count(|a| *a == Attempt::Timeout),
            self.duplicates(),
        )
    }
}

/// Starts sending `webhooks` in order, one every `config.interval`, each retried on
/// its own until a 2xx or `give_up`. Returns the live counters and the task that
/// ends with the report once every message (and duplicate) is done.
pub fn spawn(
    config: SenderConfig,
    webhooks: Vec<Webhook>,
) -> (Arc<Progress>, tokio::task::JoinHandle<Report>) {
    let progress = Arc::new(Progress::default());
    let live = progress.clone();
    let task = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(SVIX_TIMEOUT)
            // A fresh connection per attempt, as a fleet of senders would open.
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let config = Arc::new(config);
        let messages = webhooks.len();
        let mut tasks = JoinSet::new();
        let mut next = tokio::time::Instant::now();
        for (i, webhook) in webhooks.into_iter().enumerate() {
            tokio::time::sleep_until(next).await;
            next += config.interval;
            live.started.fetch_add(1, Ordering::Relaxed);
            let (client, config, live) = (client.clone(), config.clone(), live.clone());
            let duplicate = config.duplicate_every > 0 && i % config.duplicate_every == 3;
            tasks.spawn(async move {
                let first = deliver(&client, &config, &webhook, false, &live).await;
                let mut out = vec![first];
                if duplicate && out[0].succeeded() {
                    // Svix delivers at least once: the same message again, a little later.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    out.push(deliver(&client, &config, &webhook, true, &live).await);
                }
                out
            });
        }
        let mut deliveries = Vec::new();
        while let Some(done) = tasks.join_next().await {
            deliveries.extend(done.expect("a delivery task"));
        }
        Report {
            messages,
            deliveries,
        }
    });
    (progress, task)
}

/// One delivery: attempts with backoff until a 2xx or `give_up`.
async fn deliver(
    client: &reqwest::Client,
    config: &SenderConfig,
    webhook: &Webhook,
    duplicate: bool,
    live: &Progress,
) -> Delivery {
    let began = Instant::now();
    let mut delivery = Delivery {
        svix_id: webhook.svix_id.clone(),
        duplicate,
        attempts: Vec::new(),
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = Instant::now();
        let outcome = attempt(client, config, webhook).await;
        let ok = outcome.ok();
        delivery
            .attempts
            .push((started, started.elapsed(), outcome));
        if ok {
            if !duplicate {
                live.succeeded.fetch_add(1, Ordering::Relaxed);
            }
            return delivery;
        }
        live.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if began.elapsed() > config.give_up {
            return delivery;
        }
        let jitter = rand::rng().random_range(0.8..1.2);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(4));
    }
}

async fn attempt(client: &reqwest::Client, config: &SenderConfig, webhook: &Webhook) -> Attempt {
    let ts = super::now_secs();
    let signature = super::sign(&config.secret, &webhook.svix_id, ts, &webhook.body);
    let sent = client
        .post(&config.url)
        .header("svix-id", &webhook.svix_id)
        .header("svix-timestamp", ts.to_string())
        .header("svix-signature", signature)
        .header("content-type", "application/json")
        .body(webhook.body.clone())
        .send()
        .await;
    match sent {
        Ok(res) => {
            let status = res.status().as_u16();
            // Read the answer to its end, as a client does before it counts it.
            match res.bytes().await {
                Ok(_) => Attempt::Status(status),
                Err(e) if e.is_timeout() => Attempt::Timeout,
                Err(_) => Attempt::ConnectionError,
            }
        }
        Err(e) if e.is_timeout() => Attempt::Timeout,
        Err(_) => Attempt::ConnectionError,
    }
}
