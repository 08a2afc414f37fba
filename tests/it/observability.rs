//! Observability (issue 11): the Prometheus metrics a short run exports, the
//! dashboard and alert rules that may name only those, their reference in
//! docs/operations.md, and JSON logs whose every line about an event carries its
//! `svix.id`, `event.type` and, once known, `workspace.id`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::common;
use crate::common::children::{Process, free_port};
use crate::common::worker::*;
use crate::common::*;
use serde_json::{Value, json};

fn repo_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// PromQL: the metric names an expression reads.

/// PromQL words that are never metric names: aggregations, keywords, and the
/// functions (recognised by the `(` after them).
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// The metric names `expr` reads: identifiers outside strings, label matchers and
/// ranges that are neither PromQL words nor called as functions, and not the
/// label lists of `by (…)`, `without (…)`, `on (…)`, `ignoring (…)`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop strings, {label matchers} and [ranges] first.
    let mut plain = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' if depth_brace == 0 => in_string = !in_string,
            _ if in_string => {}
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => plain.push(c),
        }
    }
    let chars: Vec<char> = plain.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            // A number (1e-9 included): skip it whole.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let called = j < chars.len() && chars[j] == '(';
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str())
            {
                skip_label_list = true;
            } else if !called && !PROMQL_WORDS.contains(&word.to_lowercase().as_str()) {
                names.insert(word);
            }
            continue;
        }
        if c == '(' && skip_label_list {
            // The label list of by/without/on/ignoring.
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_label_list = false;
        }
        i += 1;
    }
    names
}

/// Every `expr` of the Grafana dashboard.
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: Value = serde_json::from_str(&repo_file("deploy/grafana/provisioner.json"))
        .expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// Every `expr:` of the alert rules (one line each, as the file says), checked
/// against the number of alerts so none is missed.
fn alert_exprs() -> Vec<(String, String)> {
    let text = repo_file("deploy/prometheus/alerts.yaml");
    let mut out = Vec::new();
    let mut alert = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = Some(name.trim().to_owned());
        } else if let Some(expr) = line.strip_prefix("expr:") {
            let expr = expr.trim();
            assert!(
                !expr.is_empty() && !expr.starts_with('|') && !expr.starts_with('>'),
                "alert expressions are written on one line: {line}"
            );
            out.push((
                alert.take().expect("an expr belongs to an alert"),
                expr.to_owned(),
            ));
        }
    }
    let alerts = text
        .lines()
        .filter(|l| l.trim().starts_with("- alert:"))
        .count();
    assert_eq!(out.len(), alerts, "one expr per alert");
    out
}

/// Metric name → type (`counter`, `gauge`, `histogram`, `summary`) of a scrape.
fn exported(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// Whether `name` is a series of the scrape: a metric, or a histogram's
/// `_bucket`/`_sum`/`_count` (a summary's `_sum`/`_count`).
fn is_exported(name: &str, types: &BTreeMap<String, String>) -> bool {
    if types.contains_key(name) {
        return true;
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| kinds.contains(&t.as_str()))
        {
            return true;
        }
    }
    false
}

/// The value of the first sample line starting with `prefix` (name and labels).
fn sample(scrape: &str, prefix: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The parser the drift check rests on finds the names of real expressions, and
/// only those: neither functions, aggregations, labels, strings nor ranges.
#[test]
fn promql_metric_names_are_read_from_expressions() {
    let names = metric_names(
        r#"sum(rate(http_requests_total{route="/webhooks/clerk",status=~"5.."}[5m])) / sum by (route) (rate(http_requests_total[$__rate_interval])) > 0.05"#,
    );
    assert_eq!(names, BTreeSet::from(["http_requests_total".to_owned()]));
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(provisioning_lag_seconds_bucket[10m]))) > 1e-9 and min by (instance, connection) (broker_connected) == 0",
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "provisioning_lag_seconds_bucket".to_owned(),
            "broker_connected".to_owned()
        ])
    );
    // Both files name metrics at all (an empty parse would pass any check).
    assert!(dashboard_exprs().len() >= 10);
    assert!(alert_exprs().len() >= 5);
}

fn worker_app() -> TestOptions {
    TestOptions {
        worker: true,
        // The broker and database gauges are polled; fast here, 15 s by default.
        extra_config: "[metrics]\npoll_interval_ms = 100\n".into(),
        ..TestOptions::default()
    }
}

fn org_created(org: &str) -> Vec<u8> {
    let mut data = fixture("organization.created")["data"].clone();
    data["id"] = json!(org);
    envelope("organization.created", data, now_secs() * 1000)
}

/// A membership that cannot be applied: no user in it (dead-lettered, class payload).
fn broken_membership(org: &str) -> Vec<u8> {
    let mut data = fixture("organizationMembership.created")["data"].clone();
    data["organization"]["id"] = json!(org);
    data.as_object_mut().unwrap().remove("public_user_data");
    envelope("organizationMembership.created", data, now_secs() * 1000)
}

/// After a short run (events provisioned, one dead-lettered, one forged webhook
/// refused, a read-API call) `/metrics` exports every metric the Grafana dashboard
/// and the alert rules name, so they cannot drift apart; every exported metric is
/// in docs/operations.md; HTTP series are labelled by route, never by raw path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_name_is_exported_and_documented() {
    // Arrange
    let app = spawn_app_with(worker_app()).await;
    let org = format!("org_{}", random_id(12));
    let good = format!("msg_{}", random_id(16));
    let bad = format!("msg_{}", random_id(16));

    // Act
    assert_eq!(
        app.post_signed(&good, &org_created(&org)).await.status(),
        200
    );
    assert_eq!(
        app.post_signed(&bad, &broken_membership(&org))
            .await
            .status(),
        200
    );
    let forged = app
        .client
        .post(format!("{}/webhooks/clerk", app.address))
        .header("svix-id", "msg_forged")
        .header("svix-timestamp", now_secs().to_string())
        .header("svix-signature", "v1,Zm9yZ2Vk")
        .body(org_created(&org))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    assert!(wait_status(&app.db, &good, "processed").await);
    assert!(wait_status(&app.db, &bad, "dead").await);
    let read = app.get_api(&format!("/v1/workspaces/{org}")).await;
    assert_eq!(read.status(), 200);
    // The poll has seen the dead letter (it runs every 100 ms here).
    let dead_queue = app.settings.broker.dead_letter_queue.clone();
    let gauge = format!(r#"broker_queue_messages{{queue="{dead_queue}",role="dead_letter"}}"#);
    let url = format!("{}/metrics", app.address);
    let scrape = eventually(Duration::from_secs(60), || async {
        let text = app.client.get(&url).send().await.ok()?.text().await.ok()?;
        (sample(&text, &gauge) == Some(1.0) && text.contains("database_connected 1"))
            .then_some(text)
    })
    .await
    .expect("the dead-letter queue depth and the database gauge are polled");

    // Assert: what the run did is counted, under bounded labels.
    let types = exported(&scrape);
    for (series, at_least) in [
        (r#"webhooks_received_total{outcome="queued"}"#, 2.0),
        (r#"webhooks_received_total{outcome="unauthorized"}"#, 1.0),
        (r#"worker_dead_lettered_total{class="payload"}"#, 1.0),
        (
            r#"worker_events_total{type="organization.created",outcome="processed"}"#,
            1.0,
        ),
        (
            r#"http_requests_total{method="GET",route="/v1/workspaces/{id}",status="200"}"#,
            1.0,
        ),
        (
            r#"http_requests_total{method="POST",route="/webhooks/clerk",status="401"}"#,
            1.0,
        ),
        (r#"broker_connected{connection="provisioner-intake"}"#, 1.0),
        (r#"broker_connected{connection="provisioner-worker"}"#, 1.0),
        ("provisioning_lag_seconds_count", 1.0),
        ("webhook_publish_seconds_count", 2.0),
        ("worker_batch_size_count", 1.0),
    ] {
        let value = sample(&scrape, series).unwrap_or_else(|| panic!("{series}: {scrape}"));
        assert!(value >= at_least, "{series} = {value}: {scrape}");
    }
    assert_eq!(
        types.get("provisioning_lag_seconds").map(String::as_str),
        Some("histogram")
    );
    assert_eq!(
        types.get("worker_batch_size").map(String::as_str),
        Some("histogram")
    );
    assert!(
        !scrape.contains(&org),
        "no request path or id becomes a label: {scrape}"
    );

    // Assert: the dashboard and the alerts name only exported metrics.
    let mut named: BTreeMap<String, String> = BTreeMap::new();
    for expr in dashboard_exprs() {
        for name in metric_names(&expr) {
            named.insert(name, format!("dashboard: {expr}"));
        }
    }
    for (alert, expr) in alert_exprs() {
        for name in metric_names(&expr) {
            named.insert(name, format!("alert {alert}: {expr}"));
        }
    }
    let missing: Vec<String> = named
        .iter()
        .filter(|(name, _)| !is_exported(name, &types))
        .map(|(name, place)| format!("{name} ({place})"))
        .collect();
    assert!(
        missing.is_empty(),
        "named but not exported: {missing:#?}\n{scrape}"
    );

    // Assert: every metric this run exported has its entry in the reference.
    let docs = repo_file("docs/operations.md");
    let reference = docs
        .split("\n## Metrics")
        .nth(1)
        .expect("docs/operations.md has a Metrics section")
        .split("\n## ")
        .next()
        .unwrap();
    let undocumented: Vec<&String> = types
        .keys()
        .filter(|name| !reference.contains(&format!("`{name}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/operations.md ## Metrics: {undocumented:?}"
    );
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// JSON logs of the real binary.

/// SIGTERM, then wait (bounded) for a clean exit.
async fn stop(child: &mut Process) {
    child.sigterm();
    let status = child.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "clean exit: {}", child.log());
}

/// The JSON lines of a log that mention `needle` anywhere.
fn lines_mentioning(log: &str, needle: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn field<'a>(line: &'a Value, key: &str) -> Option<&'a str> {
    line.get(key).and_then(Value::as_str)
}

/// With LOG_FORMAT=json, every line that mentions an event — intake, publish,
/// worker, provision, dead letter, `dlq replay` — carries its svix.id and event.type
/// as top-level keys, and workspace.id once the worker has read it; the separate
/// worker process serves its own /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_of_an_event_carry_its_ids() {
    // Arrange: intake and a worker as separate processes, as in production.
    let iso = Isolation::new();
    let config = common::ops::config_file(&iso, "");
    let (http_port, metrics_port) = (free_port(), free_port());
    let env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), iso.database_url()),
        ("AMQP_URL".into(), base_amqp_url()),
        (
            "PROVISIONER_LISTEN".into(),
            format!("127.0.0.1:{http_port}"),
        ),
        ("PROVISIONER_CONFIG".into(), config.display().to_string()),
        ("RUST_LOG".into(), "debug".into()),
        ("LOG_FORMAT".into(), "json".into()),
    ];
    let mut worker_env = env.clone();
    worker_env.push((
        "PROVISIONER_METRICS_LISTEN".into(),
        format!("127.0.0.1:{metrics_port}"),
    ));
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http_port}");
    let mut intake = Process::start_stderr_only("intake", &["serve", "--no-worker"], &env);
    intake.wait_healthy(&base).await;
    let mut worker = Process::start_stderr_only("worker", &["worker"], &worker_env);
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    worker.wait_ok(&metrics_url).await;
    let db = direct_pool(&iso).await;

    let org = format!("org_{}", random_id(12));
    let good = format!("msg_{}", random_id(16));
    let bad = format!("msg_{}", random_id(16));
    let send = |id: String, body: Vec<u8>| {
        let client = client.clone();
        let url = format!("{base}/webhooks/clerk");
        async move {
            let ts = now_secs();
            client
                .post(url)
                .header("svix-id", &id)
                .header("svix-timestamp", ts.to_string())
                .header("svix-signature", sign(SECRET, &id, ts, &body))
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    // Act: one event provisioned, one dead-lettered, then replayed (and
    // dead-lettered again: it is still broken).
    assert_eq!(send(good.clone(), org_created(&org)).await, 200);
    assert_eq!(send(bad.clone(), broken_membership(&org)).await, 200);
    assert!(
        wait_status(&db, &good, "processed").await,
        "{}",
        worker.log()
    );
    assert!(wait_status(&db, &bad, "dead").await, "{}", worker.log());
    let dead_queue = format!("{}.provisioner.dead", iso.prefix);
    assert!(wait_depth(&dead_queue, 1).await);
    let mut replay =
        Process::start_stderr_only("dlq replay", &["dlq", "replay", "--id", &bad], &env);
    let status = replay.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", replay.log());
    // Dead again after the replay: two dead-letter lines in the worker's log.
    let dead_again = eventually(Duration::from_secs(60), || async {
        let n = worker
            .log()
            .lines()
            .filter(|l| l.contains(&bad) && l.contains("event dead-lettered"))
            .count();
        (n >= 2).then_some(())
    })
    .await;
    assert!(dead_again.is_some(), "{}", worker.log());
    let worker_metrics = client
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    stop(&mut intake).await;
    stop(&mut worker).await;

    // Assert: the worker's own listener exported its series.
    assert!(
        worker_metrics
            .contains(r#"worker_events_total{type="organization.created",outcome="processed"} 1"#),
        "{worker_metrics}"
    );
    // Assert: every line mentioning an event carries its ids.
    let (intake_text, worker_text, replay_text) = (intake.log(), worker.log(), replay.log());
    let cases = [
        (&good, "organization.created", Some(org.as_str())),
        // Its body does not decode, so the worker never learns its workspace.
        (&bad, "organizationMembership.created", None),
    ];
    for (id, kind, workspace) in cases {
        let intake_lines = lines_mentioning(&intake_text, id);
        let worker_lines = lines_mentioning(&worker_text, id);
        let messages = |lines: &[Value]| -> Vec<String> {
            lines
                .iter()
                .filter_map(|l| field(l, "message").map(str::to_owned))
                .collect()
        };
        assert!(
            messages(&intake_lines)
                .iter()
                .any(|m| m == "webhook queued"),
            "{id}: {intake_text}"
        );
        let expected = if workspace.is_some() {
            "event committed"
        } else {
            "event dead-lettered"
        };
        assert!(
            messages(&worker_lines).iter().any(|m| m == expected),
            "{id}: {worker_text}"
        );
        for line in intake_lines.iter().chain(&worker_lines) {
            assert_eq!(field(line, "svix.id"), Some(id.as_str()), "{line}");
            assert_eq!(field(line, "event.type"), Some(kind), "{line}");
        }
        for line in &worker_lines {
            assert_eq!(field(line, "workspace.id"), workspace, "{line}");
        }
    }
    let replay_lines = lines_mentioning(&replay_text, &bad);
    assert!(
        replay_lines
            .iter()
            .any(|l| field(l, "message") == Some("dead letter replayed")),
        "{replay_text}"
    );
    for line in &replay_lines {
        assert_eq!(field(line, "svix.id"), Some(bad.as_str()), "{line}");
        assert_eq!(
            field(line, "event.type"),
            Some("organizationMembership.created"),
            "{line}"
        );
        assert_eq!(field(line, "workspace.id"), Some(org.as_str()), "{line}");
    }
    let _ = std::fs::remove_file(&config);
}
