//! One nemesis run: rounds of (generate a history, send it like Svix while the
//! faults of the schedule hit and the reads sample, check), until the rounds or the
//! minutes are done, and the table row of the run.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::common::SECRET;
use crate::common::database::TestDatabase;
use crate::common::svix_sender::{self, Report, SenderConfig};
use crate::nemesis::checker;
use crate::nemesis::faults::{self, Tally};
use crate::nemesis::generator;
use crate::nemesis::stack::Stack;
use crate::nemesis::traffic;

/// How a run is made.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// Rounds to run at least.
    pub rounds: u64,
    /// Go on with more rounds until this much time has passed.
    pub minutes: f64,
    /// Model operations per round.
    pub ops: usize,
    /// Time between two webhooks' first attempts (over all intakes).
    pub interval_ms: u64,
    pub intakes: usize,
    pub workers: usize,
    /// Inject faults (off: the pipeline alone).
    pub faults: bool,
    /// On a three-node RabbitMQ cluster of the run's own.
    pub cluster: bool,
}

/// What a run did and found: one row of docs/reliability.md.
#[derive(Debug, Default)]
pub struct Row {
    pub seed: u64,
    pub minutes: f64,
    pub rounds: u64,
    pub events: usize,
    pub sent: usize,
    pub retried: usize,
    pub duplicates: usize,
    pub faults: Tally,
    pub reads: usize,
    pub reads_judged: usize,
    pub writes: usize,
    pub syncs: usize,
    pub violations: usize,
    pub peak_rss_mb: f64,
}

impl Row {
    /// The table's header.
    pub fn header() -> &'static str {
        "| seed | minutes | rounds | events | webhooks sent | retried | duplicates | faults | reads sampled (judged) | writes | syncs | violations | peak RSS MB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|"
    }

    /// The row, as markdown.
    pub fn line(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {:.0} |",
            self.seed,
            self.minutes,
            self.rounds,
            self.events,
            self.sent,
            self.retried,
            self.duplicates,
            if faults.is_empty() {
                "none".to_owned()
            } else {
                faults.join(", ")
            },
            self.reads,
            self.reads_judged,
            self.writes,
            self.syncs,
            self.violations,
            self.peak_rss_mb
        )
    }
}

/// Sends `webhooks` split over the intakes (one Svix-like sender each).
fn send(
    stack: &Stack,
    webhooks: Vec<crate::common::history::Webhook>,
    interval_ms: u64,
) -> Vec<tokio::task::JoinHandle<Report>> {
    let n = stack.intakes.len();
    (0..n)
        .map(|i| {
            let mine: Vec<_> = webhooks.iter().skip(i).step_by(n).cloned().collect();
            let mut config = SenderConfig::new(&stack.base(i), SECRET);
            config.interval = Duration::from_millis(interval_ms * n as u64);
            config.duplicate_every = 7;
            config.give_up = Duration::from_secs(150);
            svix_sender::spawn(config, mine).1
        })
        .collect()
}

/// Runs the nemesis; returns its row and every violation, each with its round.
pub async fn run(cfg: &Config) -> (Row, Vec<String>) {
    let began = Instant::now();
    let Some(mut stack) = Stack::start(cfg.intakes, cfg.workers, cfg.cluster).await else {
        return (Row::default(), Vec::new());
    };
    let oracle = TestDatabase::create().await;
    let mut row = Row {
        seed: cfg.seed,
        ..Row::default()
    };
    let mut violations = Vec::new();
    let mut poisons = std::collections::BTreeSet::new();
    let mut round = 0;
    while round < cfg.rounds || began.elapsed().as_secs_f64() < cfg.minutes * 60.0 {
        let prefix = format!("n{round}x");
        let r = generator::round(cfg.seed, round, cfg.ops, &prefix);
        let stream = Duration::from_millis(cfg.interval_ms * r.webhooks.len() as u64);
        let schedule = if cfg.faults {
            faults::schedule(
                cfg.seed,
                round,
                stream,
                cfg.intakes.max(cfg.workers),
                cfg.cluster,
            )
        } else {
            Vec::new()
        };
        let mut webhooks = r.webhooks.clone();
        webhooks.extend(r.poisons.iter().cloned());
        poisons.extend(r.poisons.iter().map(|w| w.svix_id.clone()));
        let stop = CancellationToken::new();
        let (reads, reading) = traffic::spawn(
            cfg.seed.wrapping_add(round),
            prefix.clone(),
            (0..stack.intakes.len()).map(|i| stack.base(i)).collect(),
            stack.db.clone(),
            stop.clone(),
        );
        // Clerk is ahead of its webhooks: the fake serves the round's end state.
        checker::serve_model(&stack.fake, &r.model, &prefix);
        let in_clerk = (0..generator::ORGS)
            .map(|o| r.model.live_org(o).is_some())
            .collect();
        let (writes, writing) = traffic::spawn_writes(
            cfg.seed.wrapping_add(round),
            prefix.clone(),
            (0..stack.intakes.len()).map(|i| stack.base(i)).collect(),
            in_clerk,
            stop.clone(),
        );
        let start = tokio::time::Instant::now();
        let senders = send(&stack, webhooks, cfg.interval_ms);
        faults::run(&mut stack, &schedule, start, &mut row.faults).await;
        let mut report = Report::default();
        for s in senders {
            let part = s.await.expect("a sender");
            report.messages += part.messages;
            report.deliveries.extend(part.deliveries);
        }
        // A replay of a poison: dead-lettered again, still once in the queue.
        let replayed = &r.poisons[0].svix_id;
        let (status, log) = stack.cli(&["dlq", "replay", "--id", replayed]).await;
        let mut found = Vec::new();
        if !status.success() {
            // Not dead yet when asked: the checker still requires it dead.
            eprintln!("nemesis: dlq replay of {replayed} exited {status}: {log}");
        }
        stop.cancel();
        reading.await.expect("the reads");
        writing.await.expect("the writes");
        found.extend(reads.violations.lock().unwrap().iter().cloned());
        found.extend(writes.violations.lock().unwrap().iter().cloned());
        let onboarding = writes.onboarding.lock().unwrap().clone();
        found.extend(
            checker::check(checker::Ctx {
                stack: &mut stack,
                round: &r,
                report: &report,
                oracle_db: &oracle.pool,
                poisons_so_far: &poisons,
                onboarding: &onboarding,
            })
            .await,
        );
        let schedule_text: Vec<String> = schedule.iter().map(|f| f.to_string()).collect();
        eprintln!(
            "nemesis seed {} round {round}: {} events, {}; faults: [{}]; reads {} (judged {}); \
             onboarding writes {}, syncs {} (abandoned {}); Clerk API requests so far {}; \
             violations {}",
            cfg.seed,
            r.model.history.len(),
            report.summary(),
            schedule_text.join(", "),
            reads.sampled.load(std::sync::atomic::Ordering::Relaxed),
            reads.judged.load(std::sync::atomic::Ordering::Relaxed),
            writes.writes.load(std::sync::atomic::Ordering::Relaxed),
            writes.syncs.load(std::sync::atomic::Ordering::Relaxed),
            writes.abandoned.load(std::sync::atomic::Ordering::Relaxed),
            stack.fake.requests().len(),
            found.len()
        );
        row.rounds += 1;
        row.events += r.model.history.len();
        row.sent += report.messages;
        row.retried += report.retries();
        row.duplicates += report.duplicates();
        row.reads += reads.sampled.load(std::sync::atomic::Ordering::Relaxed);
        row.reads_judged += reads.judged.load(std::sync::atomic::Ordering::Relaxed);
        row.writes += writes.writes.load(std::sync::atomic::Ordering::Relaxed);
        row.syncs += writes.syncs.load(std::sync::atomic::Ordering::Relaxed);
        row.violations += found.len();
        for f in found {
            violations.push(format!(
                "round {round} (schedule [{}]): {f}",
                schedule_text.join(", ")
            ));
        }
        round += 1;
        if !violations.is_empty() {
            // Keep the processes' logs (they go with the stack).
            for slot in stack.slots_mut() {
                let path = std::env::temp_dir().join(format!(
                    "nemesis-seed{}-{}.log",
                    cfg.seed,
                    slot.process.name.replace(' ', "-")
                ));
                if std::fs::write(&path, slot.process.log()).is_ok() {
                    violations.push(format!(
                        "log of {} kept at {}",
                        slot.process.name,
                        path.display()
                    ));
                }
            }
            break;
        }
    }
    row.minutes = began.elapsed().as_secs_f64() / 60.0;
    row.peak_rss_mb = stack.peak_rss_kb() as f64 / 1024.0;
    (row, violations)
}

/// Runs and fails with the seed, the schedule and every violation.
pub async fn assert_holds(cfg: Config) -> Row {
    let (row, violations) = run(&cfg).await;
    println!("{}\n{}", Row::header(), row.line());
    assert!(
        violations.is_empty(),
        "the nemesis found {} violations with seed {} (reproduce: NEMESIS_SEED={} cargo test \
         --test it nemesis::nemesis_seed -- --ignored --nocapture):\n{}",
        violations.len(),
        cfg.seed,
        cfg.seed,
        violations
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    row
}
