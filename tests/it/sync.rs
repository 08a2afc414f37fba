//! `POST /v1/workspaces/{id}/sync`: the main app's just-in-time sync from Clerk,
//! against a local fake of the Backend API and the real service.

// A sync whose caller gives up (issue 19 item 3), in a file of its own.
mod abandoned;

use crate::common;
use crate::common::api_support::Call;
use crate::common::story::{org, person};
use crate::common::{TestApp, TestOptions, spawn_app_with};
use provisioner::clerk::fake::{Change, FakeClerk, Scripted};
use provisioner::config::Settings;
use provisioner::provision::Provisioner;
use serde_json::Value;

const KEY: &str = "sk_test_sync_fake_key_0123456789";
const T0: i64 = 1_750_000_000_000;

async fn app_with_clerk(fake: Option<&FakeClerk>) -> TestApp {
    app_with_clerk_and(fake, "").await
}

async fn app_with_clerk_and(fake: Option<&FakeClerk>, extra: &str) -> TestApp {
    let mut opts = match fake {
        Some(fake) => TestOptions::with_clerk(fake),
        None => TestOptions {
            extra_config: "[reconcile]\nrequests_per_second = 0\n".to_owned(),
            ..TestOptions::default()
        },
    };
    opts.extra_config.push_str(extra);
    spawn_app_with(opts).await
}

/// An application reading `fake` with a key `CLERK_INSTANCE_ID` says is of another
/// instance (`ins_production`), and `extra` TOML after `[reconcile]`'s.
async fn app_of_another_instance(fake: &FakeClerk, extra: &str) -> TestApp {
    let mut opts = TestOptions::with_clerk(fake);
    opts.env
        .push(("CLERK_INSTANCE_ID".to_owned(), "ins_production".to_owned()));
    opts.extra_config.push_str(extra);
    spawn_app_with(opts).await
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

/// The sync route provisions a workspace whose webhook has not arrived yet.
#[tokio::test]
async fn sync_provisions_a_workspace_the_webhook_has_not_brought_yet() {
    let fake = FakeClerk::start(KEY).await;
    let app = app_with_clerk(Some(&fake)).await;
    let acme = org("org_jit_acme").named("Acme").version(T0);
    fake.put_organization(acme.data_at(T0));
    fake.put_membership(
        acme.membership("orgmem_jit_ada", &person("user_jit_ada", "a"))
            .role("org:admin")
            .data_at(T0),
    );

    let (status, _) = Call::get("/v1/workspaces/org_jit_acme").send(&app).await;
    assert_eq!(status, 404, "not provisioned yet");

    // A user who is not a member cannot make it visible to themselves.
    let (status, body) = Call::post("/v1/workspaces/org_jit_acme/sync", "")
        .acting("user_jit_eve")
        .send(&app)
        .await;
    assert_eq!(status, 404, "{body}");

    // The member gets the workspace, as GET shows it.
    let (status, body) = Call::post("/v1/workspaces/org_jit_acme/sync", "")
        .acting("user_jit_ada")
        .send(&app)
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, get) = Call::get("/v1/workspaces/org_jit_acme").send(&app).await;
    assert_eq!(body, get, "the same body as GET /v1/workspaces/{{id}}");
    assert_eq!(body["name"], "Acme");
    let actor: String = sqlx::query_scalar(
        "select distinct actor from audit_log where workspace_id = 'org_jit_acme'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(actor, "reconcile");
}

/// The sync route answers 404 for an organization Clerk does not have.
#[tokio::test]
async fn sync_answers_404_for_an_organization_clerk_does_not_have() {
    let fake = FakeClerk::start(KEY).await;
    let app = app_with_clerk(Some(&fake)).await;
    let (status, body) = Call::post("/v1/workspaces/org_jit_none/sync", "")
        .send(&app)
        .await;
    assert_eq!((status, code(&body)), (404, "not_found"), "{body}");
}

/// Without `CLERK_SECRET_KEY` the sync answers 501 `reconcile_not_configured`
/// without Retry-After; with Clerk failing past the retries, 503
/// `clerk_unavailable`; without a token, 401.
#[tokio::test]
async fn sync_without_a_key_is_501_and_without_clerk_503() {
    let app = app_with_clerk(None).await;
    let response = app
        .client
        .post(format!("{}/v1/workspaces/org_x/sync", app.address))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 501, "not configured is no passing state");
    assert!(response.headers().get("retry-after").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "reconcile_not_configured", "{body}");

    let fake = FakeClerk::start(KEY).await;
    let app = app_with_clerk(Some(&fake)).await;
    // Clerk keeps failing past the client's retries.
    fake.fail_next((0..10).map(|_| Scripted {
        status: 502,
        retry_after: None,
    }));
    let (status, body) = Call::post("/v1/workspaces/org_x/sync", "").send(&app).await;
    assert_eq!((status, code(&body)), (503, "clerk_unavailable"), "{body}");
    let (status, body) = Call::post("/v1/workspaces/org_x/sync", "")
        .token(None)
        .send(&app)
        .await;
    assert_eq!(status, 401, "{body}");
}

/// Concurrent syncs of one organization share one fetch from Clerk and converge with a
/// webhook racing them.
#[tokio::test]
async fn concurrent_syncs_share_one_fetch_and_converge_with_a_racing_webhook() {
    let fake = FakeClerk::start(KEY).await;
    let app = app_with_clerk(Some(&fake)).await;
    // Clerk's answer is the older snapshot; a webhook brings a newer one meanwhile.
    let older = org("org_jit_race").named("Older").version(T0);
    let newer = org("org_jit_race").named("Newer").version(T0 + 100);
    fake.put_organization(older.data_at(T0));

    let (reached, release) = fake.gate("/v1/organizations/org_jit_race");
    let mut calls = Vec::new();
    for _ in 0..5 {
        let address = app.address.clone();
        calls.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{address}/v1/workspaces/org_jit_race/sync"))
                .bearer_auth(common::TOKEN)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    reached.await.unwrap();
    // Let the other four calls join the one in flight.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let p = Provisioner::new(Settings::from_sources(None, |_| None).unwrap().provisioning);
    for r in p
        .apply_batch(&app.db, &[newer.created(T0 + 100).incoming()])
        .await
    {
        r.unwrap();
    }
    release.send(()).unwrap();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let fetches = fake
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/organizations/org_jit_race")
        .count();
    assert_eq!(fetches, 1, "five concurrent syncs, one fetch");
    let (_, body) = Call::get("/v1/workspaces/org_jit_race").send(&app).await;
    assert_eq!(
        body["name"], "Newer",
        "the older API snapshot did not overwrite the webhook"
    );
}

/// `[reconcile] interval_s`: `serve` reconciles on its own, one process of the
/// deployment at a time (an advisory lock), and says so in its metrics.
#[tokio::test]
async fn scheduled_reconcile_runs_under_one_lock_and_reports_metrics() {
    let fake = FakeClerk::start(KEY).await;
    fake.put_organization(org("org_sched").data_at(T0));
    // Another process of the deployment is running one: hold its lock in the
    // app's database before the app starts.
    let iso = common::Isolation::new();
    let settings = common::test_settings(&iso, &TestOptions::default());
    let pool = provisioner::db::prepare(&settings.database).await.unwrap();
    let mut holder = pool.acquire().await.unwrap();
    let held: bool = sqlx::query_scalar(
        "select pg_try_advisory_lock(hashtext('callmine-provisioner:reconcile'))",
    )
    .fetch_one(&mut *holder)
    .await
    .unwrap();
    assert!(held);
    let app = common::spawn_app_isolated(
        iso,
        TestOptions {
            env: vec![
                ("CLERK_SECRET_KEY".to_owned(), fake.key.clone()),
                ("CLERK_API_URL".to_owned(), fake.url.clone()),
            ],
            extra_config: "[reconcile]\nrequests_per_second = 0\ninterval_s = 1\n".into(),
            ..TestOptions::default()
        },
    )
    .await;
    let metrics = |app: &TestApp| {
        let client = app.client.clone();
        let url = format!("{}/metrics", app.address);
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let skipped = common::eventually(std::time::Duration::from_secs(20), || {
        let m = metrics(&app);
        async move {
            m.await
                .contains("provisioner_reconcile_runs_total{result=\"skipped\"}")
                .then_some(())
        }
    })
    .await;
    assert!(
        skipped.is_some(),
        "runs are skipped while another holds the lock"
    );
    let (status, _) = Call::get("/v1/workspaces/org_sched").send(&app).await;
    assert_eq!(status, 404, "nothing ran while the lock was held");

    let _: bool =
        sqlx::query_scalar("select pg_advisory_unlock(hashtext('callmine-provisioner:reconcile'))")
            .fetch_one(&mut *holder)
            .await
            .unwrap();
    drop(holder);
    pool.close().await;
    let provisioned = common::eventually(std::time::Duration::from_secs(20), || {
        let call = Call::get("/v1/workspaces/org_sched");
        let app = &app;
        async move { (call.send(app).await.0 == 200).then_some(()) }
    })
    .await;
    assert!(provisioned.is_some(), "the scheduled run provisioned it");
    let text = common::eventually(std::time::Duration::from_secs(20), || {
        let m = metrics(&app);
        async move {
            let text = m.await;
            text.contains("provisioner_reconcile_runs_total{result=\"ok\"}")
                .then_some(text)
        }
    })
    .await
    .expect("an ok run is counted");
    assert!(
        text.contains("provisioner_reconcile_drift{kind=\"workspace_missing\"}"),
        "{text}"
    );
    assert!(
        text.contains("provisioner_reconcile_duration_seconds"),
        "{text}"
    );
}

/// Every pooled connection carries `idle_in_transaction_session_timeout` from
/// `[database]`, the backstop that ends a transaction nobody drives any more.
#[tokio::test]
async fn pooled_sessions_end_a_transaction_left_idle() {
    let iso = common::Isolation::new();
    let settings = common::test_settings(
        &iso,
        &TestOptions {
            extra_config: "[database]\nidle_in_transaction_session_timeout_ms = 1500\n".into(),
            ..TestOptions::default()
        },
    );
    let pool = provisioner::db::prepare(&settings.database).await.unwrap();
    let timeout: String = sqlx::query_scalar("show idle_in_transaction_session_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(timeout, "1500ms");
    let default = Settings::from_sources(None, |_| None).unwrap();
    assert_eq!(
        default.database.idle_in_transaction_session_timeout_ms,
        60_000
    );

    // A transaction left idle is ended by the server, and its lock is free.
    let mut left = pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(42)")
        .execute(&mut *left)
        .await
        .unwrap();
    let freed = common::eventually(std::time::Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("select pg_try_advisory_xact_lock(42)")
                .fetch_one(&pool)
                .await
                .unwrap()
                .then_some(())
        }
    })
    .await;
    assert!(freed.is_some(), "the idle transaction's lock came back");
    drop(left);
    pool.close().await;
}

/// A just-in-time sync never removes a workspace: Clerk's 404 is answered 404,
/// and the workspace and its members are left as they are.
#[tokio::test]
async fn sync_never_removes_a_workspace_clerk_answers_404_for() {
    let fake = FakeClerk::start(KEY).await;
    let app = app_with_clerk(Some(&fake)).await;
    let acme = org("org_jit_kept").version(T0);
    let p = Provisioner::new(app.settings.provisioning.clone());
    let ada = acme
        .membership("orgmem_jit_kept", &person("user_jit_kept", "a"))
        .role("org:admin");
    for r in p
        .apply_batch(
            &app.db,
            &[acme.created(T0).incoming(), ada.created(T0).incoming()],
        )
        .await
    {
        r.unwrap();
    }
    let (_, before) = Call::get("/v1/workspaces/org_jit_kept").send(&app).await;
    let (status, body) = Call::post("/v1/workspaces/org_jit_kept/sync", "")
        .send(&app)
        .await;
    assert_eq!((status, code(&body)), (404, "not_found"), "{body}");
    let (status, after) = Call::get("/v1/workspaces/org_jit_kept").send(&app).await;
    assert_eq!(status, 200);
    assert_eq!(after, before, "the workspace is left as it was");
    assert_eq!(after["status"], "active");
    let (status, _) = Call::get("/v1/workspaces/org_jit_kept/members/user_jit_kept")
        .acting("user_jit_kept")
        .send(&app)
        .await;
    assert_eq!(status, 200, "its admin keeps access");
}

/// A sync of a 501-member organization whose list shifts between its two pages
/// keeps the member at the page boundary.
#[tokio::test]
async fn sync_never_removes_the_member_at_a_shifted_page_boundary() {
    let fake = FakeClerk::start(KEY).await;
    let app = app_with_clerk(Some(&fake)).await;
    let o = org("org_jit_big").version(T0);
    fake.put_organization(o.data_at(T0));
    for j in 0..501 {
        let p = person(&format!("user_jit_big_{j:04}"), "b");
        let m = o
            .membership(&format!("orgmem_jit_big_{j:04}"), &p)
            .since(T0 + j);
        fake.put_membership(m.data_at(T0 + j));
    }
    let (status, body) = Call::post("/v1/workspaces/org_jit_big/sync", "")
        .send(&app)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["member_count"], 501);

    fake.before_page(
        "/v1/organizations/org_jit_big/memberships",
        500,
        Change::DeleteMembership("orgmem_jit_big_0003".into()),
    );
    let (status, body) = Call::post("/v1/workspaces/org_jit_big/sync", "")
        .acting("user_jit_big_0500")
        .send(&app)
        .await;
    assert_eq!(
        status, 200,
        "the member at the boundary still sees it: {body}"
    );
    let (status, _) = Call::get("/v1/workspaces/org_jit_big/members/user_jit_big_0500")
        .send(&app)
        .await;
    assert_eq!(status, 200);
}

/// With `CLERK_INSTANCE_ID` set and a key of another instance, the sync answers
/// 503 `clerk_misconfigured` (no Retry-After) naming both settings, and changes
/// nothing.
#[tokio::test]
async fn sync_refuses_a_key_of_another_instance() {
    let fake = FakeClerk::start(KEY).await;
    let app = app_of_another_instance(&fake, "").await;
    fake.put_organization(org("org_jit_other").data_at(T0));
    let response = app
        .client
        .post(format!("{}/v1/workspaces/org_jit_other/sync", app.address))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "clerk_misconfigured", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("CLERK_SECRET_KEY") && message.contains("CLERK_INSTANCE_ID"),
        "{message}"
    );
    assert!(!message.contains(KEY));
    let (status, _) = Call::get("/v1/workspaces/org_jit_other").send(&app).await;
    assert_eq!(status, 404, "nothing was provisioned");
}

/// The scheduled reconcile with a key of another instance fails every run
/// (`result="failed"`) and removes nothing.
#[tokio::test]
async fn scheduled_reconcile_refuses_a_key_of_another_instance() {
    let fake = FakeClerk::start(KEY).await;
    let app = app_of_another_instance(&fake, "interval_s = 1\n").await;
    // Here, not in (this key's) Clerk: a run with the wrong key would remove it.
    let p = Provisioner::new(app.settings.provisioning.clone());
    for r in p
        .apply_batch(&app.db, &[org("org_sched_prod").created(T0).incoming()])
        .await
    {
        r.unwrap();
    }
    let failed = common::eventually(std::time::Duration::from_secs(20), || {
        let client = app.client.clone();
        let url = format!("{}/metrics", app.address);
        async move {
            let text = client.get(url).send().await.unwrap().text().await.unwrap();
            text.contains("provisioner_reconcile_runs_total{result=\"failed\"} 2")
                .then_some(())
        }
    })
    .await;
    assert!(failed.is_some(), "two scheduled runs failed");
    let (status, body) = Call::get("/v1/workspaces/org_sched_prod").send(&app).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("active")));
    let asked = fake
        .requests()
        .into_iter()
        .filter(|q| q.path.starts_with("/v1/organizations"))
        .count();
    assert_eq!(asked, 0, "no organization was even asked about");
}
