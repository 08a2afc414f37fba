//! The real `provisioner` binary: start-up, health, configuration errors, secrets in
//! logs, and graceful shutdown on SIGTERM.

use std::time::Duration;

use crate::common::children::{Process, free_port};
use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The environment of a binary run by a test: only what the test gives it (never the
/// developer's own settings), with this test's database, queues and port.
fn base_env(iso: &Isolation, config: &TempFile, port: u16) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), iso.database_url()),
        ("AMQP_URL".into(), base_amqp_url()),
        ("PROVISIONER_LISTEN".into(), format!("127.0.0.1:{port}")),
        ("PROVISIONER_CONFIG".into(), config.0.display().to_string()),
        ("RUST_LOG".into(), "info".into()),
    ]
}

/// `serve --no-worker` with exactly `env`, listening on `port`, once `/healthz`
/// answers 200; with its base URL.
async fn serve_healthy(env: &[(String, String)], port: u16) -> (Process, String) {
    let mut child = Process::start("serve", &["serve", "--no-worker"], env);
    let base = format!("http://127.0.0.1:{port}");
    child.wait_healthy(&base).await;
    (child, base)
}

/// A one-line error naming `setting` and a non-zero exit, from a run that fails
/// before serving.
async fn assert_fails_naming(env: &[(String, String)], setting: &str) -> String {
    let mut child = Process::start("serve", &["serve"], env);
    let status = child.wait_exit(Duration::from_secs(30)).await;
    let stderr = child.log();
    assert!(!status.success(), "{setting}: exits non-zero");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{setting}: one line: {stderr:?}");
    assert!(lines[0].contains(setting), "{setting}: named in {stderr:?}");
    stderr
}

/// `serve --no-worker` starts, answers /healthz, queues events, and on SIGTERM stops
/// accepting, completes the request in flight (its event is queued) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    // Arrange
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let port = free_port();
    let (mut child, base) = serve_healthy(&base_env(&iso, &config, port), port).await;
    let client = reqwest::Client::new();
    let queue = format!("{}.provisioner.events", iso.prefix);

    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    for _ in 0..3 {
        let id = format!("msg_{}", random_id(20));
        let ts = now_secs();
        let res = client
            .post(format!("{base}/webhooks/clerk"))
            .header("svix-id", &id)
            .header("svix-timestamp", ts.to_string())
            .header("svix-signature", sign(SECRET, &id, ts, &body))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }

    // A request in flight: headers and half of its body sent, the rest held back.
    let in_flight_id = format!("msg_{}", random_id(20));
    let ts = now_secs();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST /webhooks/clerk HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nsvix-id: {in_flight_id}\r\nsvix-timestamp: {ts}\r\nsvix-signature: {}\r\n\r\n",
        body.len(),
        sign(SECRET, &in_flight_id, ts, &body)
    );
    let (first, rest) = body.split_at(body.len() / 2);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // let the server start reading

    // Act
    child.sigterm();

    // Assert: new connections are refused while the request in flight stays open.
    let stopped_accepting = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        stopped_accepting.is_some(),
        "the listener closes on SIGTERM"
    );
    assert!(child.exit_status().is_none(), "still draining");

    stream.write_all(rest).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("the in-flight request is answered")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(&in_flight_id), "{response}");

    let status = child.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "exit 0 after SIGTERM: {status}: {}",
        child.log()
    );
    let msgs = drain_queue(&queue).await;
    assert_eq!(
        msgs.len(),
        4,
        "every 200 was queued, the in-flight one included"
    );
    assert!(msgs.iter().any(|m| {
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
            == Some(in_flight_id.as_str())
    }));
    let mut names = vec![queue];
    names.push(format!("{}.provisioner.dead", iso.prefix));
    delete_queues(&names).await;
}

/// SIGTERM on an idle service exits 0 promptly, and /readyz was ready before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_service_is_ready_and_stops_on_sigterm() {
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let port = free_port();
    let (mut child, base) = serve_healthy(&base_env(&iso, &config, port), port).await;
    let client = reqwest::Client::new();
    let res = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);

    child.sigterm();

    let status = child.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}: {}", child.log());
}

/// A bad or missing setting stops the binary at start-up with one line naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_fails_with_one_line_naming_it() {
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let env = base_env(&iso, &config, free_port());
    let with = |k: &str, v: &str| {
        let mut e = env.clone();
        e.retain(|(name, _)| name != k);
        e.push((k.to_owned(), v.to_owned()));
        e
    };
    assert_fails_naming(
        &with("PROVISIONER_LISTEN", "nonsense"),
        "PROVISIONER_LISTEN",
    )
    .await;
    assert_fails_naming(&with("AMQP_URL", "http://nope"), "AMQP_URL").await;
    assert_fails_naming(
        &with("CLERK_WEBHOOK_SECRET", "hunter2"),
        "CLERK_WEBHOOK_SECRET",
    )
    .await;
    assert_fails_naming(
        &with("PROVISIONER_CONFIG", "/nonexistent/provisioner.toml"),
        "PROVISIONER_CONFIG",
    )
    .await;
    let bad_file = TempFile::new("bad.toml", "[worker]\nconcurrency = 0\n");
    assert_fails_naming(
        &with("PROVISIONER_CONFIG", &bad_file.0.display().to_string()),
        "worker.concurrency",
    )
    .await;
}

/// PROVISIONER_ENV=production refuses to start with the development secret or
/// tokens, or with an API or ops token shorter than 32 characters, naming the
/// setting in one line that never shows the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_refuses_the_development_secret() {
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let mut env = base_env(&iso, &config, free_port());
    env.push(("PROVISIONER_ENV".into(), "production".into()));
    assert_fails_naming(&env, "CLERK_WEBHOOK_SECRET").await;
    env.push((
        "CLERK_WEBHOOK_SECRET".into(),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
    ));
    assert_fails_naming(&env, "PROVISIONER_API_TOKENS").await;
    // A short API token, beside a long ops token.
    env.push(("PROVISIONER_API_TOKENS".into(), "prod-api-token".into()));
    env.push((
        "PROVISIONER_OPS_TOKENS".into(),
        "prod-ops-token-0123456789abcdefghij".into(),
    ));
    let stderr = assert_fails_naming(&env, "PROVISIONER_API_TOKENS").await;
    assert!(stderr.contains("32 characters"), "{stderr}");
    assert!(!stderr.contains("prod-api-token"), "{stderr}");
    env.push((
        "PROVISIONER_API_TOKENS".into(),
        "prod-api-token-0123456789abcdefghij".into(),
    ));
    env.retain(|(k, _)| k != "PROVISIONER_OPS_TOKENS");
    assert_fails_naming(&env, "PROVISIONER_OPS_TOKENS").await;
    env.push(("PROVISIONER_OPS_TOKENS".into(), "prod-ops-token".into()));
    let stderr = assert_fails_naming(&env, "PROVISIONER_OPS_TOKENS").await;
    assert!(!stderr.contains("prod-ops-token"), "{stderr}");
}

/// The real binary never prints a secret it refuses: a token, webhook secret or
/// key written as a number in the config file, and a `CLERK_API_URL` with
/// user-info or `?password=`, each fail in one line naming the setting without
/// the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_secrets_never_appear_in_the_start_up_error() {
    let iso = Isolation::new();
    let port = free_port();
    for (table, key, variable) in [
        ("api", "tokens", "PROVISIONER_API_TOKENS"),
        ("ops", "tokens", "PROVISIONER_OPS_TOKENS"),
        ("clerk", "webhook_secrets", "CLERK_WEBHOOK_SECRET"),
        ("clerk", "secret_key", "CLERK_SECRET_KEY"),
    ] {
        let config = TempFile::new(
            "config.toml",
            &format!("{}\n[{table}]\n{key} = 982451653\n", iso.broker_toml()),
        );
        let stderr = assert_fails_naming(&base_env(&iso, &config, port), variable).await;
        assert!(!stderr.contains("982451653"), "{table}.{key}: {stderr}");
    }
    let config = TempFile::new("config.toml", &iso.broker_toml());
    for url in [
        "https://clerk_user:hunter10@api.clerk.com",
        "https://api.clerk.com/?password=hunter10",
        "https://hunter10@api.clerk.com",
    ] {
        let mut env = base_env(&iso, &config, port);
        env.push(("CLERK_API_URL".into(), url.into()));
        let stderr = assert_fails_naming(&env, "CLERK_API_URL").await;
        assert!(!stderr.contains("hunter10"), "{url}: {stderr}");
    }
}

/// The image defaults to production: the Dockerfile sets `PROVISIONER_ENV=
/// production` (and listens on 0.0.0.0:8080), and the binary run with the
/// image's environment and no secrets of its own refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_defaults_to_production_and_refuses_development_secrets() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let image_env = dockerfile_env(&dockerfile);
    let value = |name: &str| {
        image_env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        value("PROVISIONER_ENV"),
        Some("production"),
        "{image_env:?}"
    );
    assert_eq!(
        value("PROVISIONER_LISTEN"),
        Some("0.0.0.0:8080"),
        "{image_env:?}"
    );

    // The image's variables, then only this test's database, broker names and a
    // local port (so a broken image cannot serve on 0.0.0.0:8080 here).
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let mut env = image_env.clone();
    env.extend(base_env(&iso, &config, free_port()));
    env.retain(|(k, _)| k != "RUST_LOG");
    assert_fails_naming(&env, "CLERK_WEBHOOK_SECRET").await;
}

/// The variables the Dockerfile's `ENV` instructions set (`ENV A=1 \ B=2` form).
fn dockerfile_env(dockerfile: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let mut lines = dockerfile.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("ENV ") else {
            continue;
        };
        let mut text = rest.trim().to_owned();
        while text.ends_with('\\') {
            text.pop();
            text.push(' ');
            text.push_str(lines.next().unwrap_or_default().trim());
        }
        for pair in text.split_whitespace() {
            let (k, v) = pair.split_once('=').expect("ENV KEY=value");
            env.push((k.to_owned(), v.trim_matches('"').to_owned()));
        }
    }
    env
}

/// Passwords and secrets never reach the logs, even at debug level and when start-up
/// fails on the very connection that carries them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs() {
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let amqp_password = format!("amqpPw{}", random_id(12));
    let db_password = format!("pgPw{}", random_id(12));
    let token = format!("tok{}", random_id(16));
    let ops_token = format!("ops{}", random_id(16));
    let webhook_secret = "whsec_c2VjcmV0LWZvci1sb2ctdGVzdC0xMjM0NTY3OA==";
    let closed_port = free_port();
    let mut env = base_env(&iso, &config, free_port());
    env.retain(|(k, _)| k != "RUST_LOG" && k != "AMQP_URL" && k != "DATABASE_URL");
    env.extend([
        ("RUST_LOG".to_owned(), "debug".to_owned()),
        (
            "AMQP_URL".to_owned(),
            format!("amqp://guest:{amqp_password}@127.0.0.1:{closed_port}/%2f"),
        ),
        // Trust authentication: the password is carried but not needed.
        (
            "DATABASE_URL".to_owned(),
            format!(
                "postgres://postgres:{db_password}@127.0.0.1:5432/{}",
                iso.database
            ),
        ),
        ("CLERK_WEBHOOK_SECRET".to_owned(), webhook_secret.to_owned()),
        ("PROVISIONER_API_TOKENS".to_owned(), token.clone()),
        ("PROVISIONER_OPS_TOKENS".to_owned(), ops_token.clone()),
    ]);
    for (format, stderr) in failed_start_logs(&env).await {
        assert!(
            stderr.contains("RabbitMQ"),
            "the failure is explained: {stderr}"
        );
        assert!(
            stderr.contains(&closed_port.to_string()),
            "and where: {stderr}"
        );
        for secret in [
            amqp_password.as_str(),
            db_password.as_str(),
            token.as_str(),
            ops_token.as_str(),
            webhook_secret,
            webhook_secret.trim_start_matches("whsec_"),
        ] {
            assert!(
                !stderr.contains(secret),
                "{format} logs leak a secret: {stderr}"
            );
        }
    }
}

/// A password written as a query parameter (`?password=`, libpq's `?sslpassword=`,
/// which sqlx would log with its value as an unknown parameter) never reaches the logs
/// either, even at debug level and when start-up fails on that very connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameter_passwords_never_appear_in_logs() {
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let amqp_password = format!("amqpQ{}", random_id(12));
    let db_password = format!("pgQ{}", random_id(12));
    let ssl_password = format!("sslQ{}", random_id(12));
    let closed_port = free_port();
    let mut env = base_env(&iso, &config, free_port());
    env.retain(|(k, _)| k != "RUST_LOG" && k != "AMQP_URL" && k != "DATABASE_URL");
    env.extend([
        ("RUST_LOG".to_owned(), "debug".to_owned()),
        (
            "AMQP_URL".to_owned(),
            format!("amqp://guest@127.0.0.1:{closed_port}/%2f?password={amqp_password}"),
        ),
        // Trust authentication: the passwords are carried but not needed.
        (
            "DATABASE_URL".to_owned(),
            format!(
                "postgres://postgres@127.0.0.1:5432/{}?password={db_password}&sslpassword={ssl_password}",
                iso.database
            ),
        ),
    ]);
    for (format, stderr) in failed_start_logs(&env).await {
        assert!(
            stderr.contains(&closed_port.to_string()),
            "the failure names where: {stderr}"
        );
        for secret in [&amqp_password, &db_password, &ssl_password] {
            assert!(
                !stderr.contains(secret.as_str()),
                "{format} logs leak {secret}: {stderr}"
            );
        }
    }
}

/// The log of `serve --no-worker` run with `env` in each log format (text, json),
/// each run failing to start (the broker is unreachable).
async fn failed_start_logs(env: &[(String, String)]) -> Vec<(&'static str, String)> {
    let mut logs = Vec::new();
    for format in ["text", "json"] {
        let mut run = env.to_vec();
        run.push(("LOG_FORMAT".into(), format.into()));
        let mut child = Process::start("serve", &["serve", "--no-worker"], &run);
        let status = child.wait_exit(Duration::from_secs(60)).await;
        let stderr = child.log();
        assert!(!status.success(), "the broker is unreachable");
        logs.push((format, stderr));
    }
    logs
}

/// The readiness queries a serve log shows: sqlx logs each statement it runs at
/// debug level (`sqlx::query`), with the statement as its `summary`.
fn readiness_queries(child: &Process) -> usize {
    child
        .log()
        .lines()
        .filter(|l| l.contains(r#""summary":"select 1""#))
        .count()
}

/// /readyz shares the worker's pool: a flood of probes asks PostgreSQL about once a
/// second (the cached answer), not once per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_readiness_probes_queries_the_database_about_once_a_second() {
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let port = free_port();
    let mut env = base_env(&iso, &config, port);
    env.retain(|(k, _)| k != "RUST_LOG");
    env.push(("RUST_LOG".into(), "info,sqlx::query=debug".into()));
    env.push(("LOG_FORMAT".into(), "json".into()));
    let (mut child, base) = serve_healthy(&env, port).await;
    let client = reqwest::Client::new();
    let before = readiness_queries(&child);

    // 8 waves of 50 concurrent probes, half a second apart: about 4 s, 400 probes.
    let started = std::time::Instant::now();
    for _ in 0..8 {
        let wave = (0..50).map(|_| {
            let client = client.clone();
            let url = format!("{base}/readyz");
            async move { client.get(url).send().await.unwrap().status().as_u16() }
        });
        let statuses = futures_util::future::join_all(wave).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs() as usize;
    child.sigterm();
    let status = child.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}: {}", child.log());
    let queries = readiness_queries(&child) - before;

    assert!(
        queries >= 1,
        "the probes did check the database: {}",
        child.log()
    );
    assert!(
        queries <= seconds + 2,
        "{queries} readiness queries for 400 probes in {seconds} s"
    );
}

/// A forged or unsigned webhook is anyone's to send, with any svix-id: none is logged
/// above debug, and the refusals are summed up in one warning per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_webhooks_are_summed_up_in_one_warning_without_their_ids() {
    let iso = Isolation::new();
    let config = TempFile::new("config.toml", &iso.broker_toml());
    let port = free_port();
    let mut env = base_env(&iso, &config, port);
    env.push(("LOG_FORMAT".into(), "json".into()));
    let (mut child, base) = serve_healthy(&env, port).await;
    let client = reqwest::Client::new();

    let ids: Vec<String> = (0..200)
        .map(|i| format!("msg_forged{i}x{}", random_id(8)))
        .collect();
    let body = br#"{"type":"user.deleted","data":{"id":"user_1"},"object":"event","timestamp":1}"#;
    let requests = ids.iter().enumerate().map(|(i, id)| {
        let client = client.clone();
        let url = format!("{base}/webhooks/clerk");
        let ts = now_secs();
        let mut req = client
            .post(url)
            .header("content-type", "application/json")
            .header("svix-id", id)
            .header("svix-timestamp", ts.to_string())
            .body(body.to_vec());
        // Half forged (a signature of another secret), half unsigned.
        if i % 2 == 0 {
            req = req.header(
                "svix-signature",
                sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", id, ts, body),
            );
        }
        async move { req.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 400),
        "{statuses:?}"
    );

    let summary = eventually(Duration::from_secs(30), || async {
        let text = child.log();
        text.lines()
            .find(|l| l.contains("webhooks refused") && l.contains(r#""refused":200"#))
            .map(str::to_owned)
    })
    .await
    .unwrap_or_else(|| panic!("one summary warning: {}", child.log()));
    assert!(summary.contains(r#""level":"WARN""#), "{summary}");
    child.sigterm();
    let status = child.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}: {}", child.log());

    let text = child.log();
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("webhooks refused"))
            .count(),
        1,
        "{text}"
    );
    for id in &ids {
        assert!(!text.contains(id.as_str()), "{id} logged: {text}");
    }
}
