//! A sync whose caller gives up mid-transaction runs to its end and leaves no
//! transaction behind (issue 19 item 3).

use super::*;
use crate::common::database::lock_waiters;

/// Sessions of the app's database that sit `idle in transaction`.
async fn idle_in_transaction(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity \
         where datname = current_database() and state like 'idle in transaction%'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// A client that gives up while its sync waits inside its transaction leaves
/// nothing behind: the sync runs to its end, a removal webhook of that workspace
/// sent right after is applied within seconds, and no connection stays idle in
/// transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_sync_runs_to_its_end_and_never_freezes_its_workspace() {
    let fake = FakeClerk::start(KEY).await;
    let app = spawn_app_with(TestOptions {
        worker: true,
        ..TestOptions::with_clerk(&fake)
    })
    .await;
    // Here: Acme with Ada as admin. Clerk: Acme renamed since, so the sync has a
    // repair to apply (a transaction that takes the workspace's lock).
    let ada = person("user_ab_ada", "a");
    let acme = org("org_abandoned").named("Acme").version(T0);
    let ada_member = acme.membership("orgmem_ab_ada", &ada).role("org:admin");
    let p = Provisioner::new(app.settings.provisioning.clone());
    for r in p
        .apply_batch(
            &app.db,
            &[
                acme.created(T0).incoming(),
                ada_member.created(T0).incoming(),
            ],
        )
        .await
    {
        r.unwrap();
    }
    let renamed = org("org_abandoned").named("Acme Renamed").version(T0 + 100);
    fake.put_organization(renamed.data_at(T0 + 100));
    fake.put_membership(
        renamed
            .membership("orgmem_ab_ada", &ada)
            .role("org:admin")
            .data_at(T0),
    );

    // Something else holds the workspace's lock, so the sync's transaction waits
    // inside; its client gives up meanwhile.
    let mut holder = app.db.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('ws:org_abandoned', 0))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let address = app.address.clone();
    let client = tokio::spawn(async move {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(1))
            .build()
            .unwrap()
            .post(format!("{address}/v1/workspaces/org_abandoned/sync"))
            .bearer_auth(common::TOKEN)
            .send()
            .await
    });
    let waiting = common::eventually(std::time::Duration::from_secs(10), || {
        let db = app.db.clone();
        async move { (lock_waiters(&db).await > 0).then_some(()) }
    })
    .await;
    assert!(waiting.is_some(), "the sync waits for the workspace's lock");
    let gave_up = client.await.unwrap();
    assert!(
        gave_up.as_ref().is_err_and(|e| e.is_timeout()),
        "the client gave up: {gave_up:?}"
    );
    // Let the server notice the closed connection before the lock is free.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    holder.commit().await.unwrap();

    // Ada is removed in Clerk; the webhook is applied within seconds.
    let removal = ada_member.deleted(T0 + 200).incoming();
    let response = app.post_signed(&removal.svix_id, &removal.body).await;
    assert_eq!(response.status(), 200);
    let removed = common::eventually(std::time::Duration::from_secs(8), || {
        let db = app.db.clone();
        async move {
            common::rows::member(&db, "orgmem_ab_ada")
                .await
                .filter(|m| m.removed)
        }
    })
    .await;
    assert!(
        removed.is_some(),
        "the removal was applied, not held behind an abandoned transaction"
    );
    let (status, _) = Call::get("/v1/workspaces/org_abandoned/members/user_ab_ada")
        .send(&app)
        .await;
    assert_eq!(status, 404, "Ada has no access any more");
    let (_, body) = Call::get("/v1/workspaces/org_abandoned").send(&app).await;
    assert_eq!(
        body["name"], "Acme Renamed",
        "the abandoned sync ran to its end"
    );
    assert_eq!(idle_in_transaction(&app).await, 0);
}

/// The ops console's sync (`JustInTime::sync_report`) also runs to its end when
/// the request waiting for it goes away mid-transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_console_sync_runs_to_its_end() {
    let db = common::database::TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let mut s = Settings::from_sources(None, |_| None).unwrap();
    s.clerk.secret_key = Some(provisioner::config::Secret::new(fake.key.clone()));
    s.clerk.api_url = fake.url.clone();
    s.reconcile.requests_per_second = 0.0;
    let p = Provisioner::new(s.provisioning.clone());
    let acme = org("org_console_gone").named("Acme").version(T0);
    for r in p
        .apply_batch(&db.pool, &[acme.created(T0).incoming()])
        .await
    {
        r.unwrap();
    }
    fake.put_organization(
        org("org_console_gone")
            .named("Acme Renamed")
            .data_at(T0 + 100),
    );
    let api = provisioner::clerk::api::ClerkApi::new(&s.clerk, &s.reconcile).unwrap();
    let sync = provisioner::reconcile::JustInTime::new(Some(
        provisioner::reconcile::Reconciler::new(api, p, db.pool.clone(), 50),
    ));

    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('ws:org_console_gone', 0))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let request = tokio::spawn(async move { sync.sync_report("org_console_gone").await });
    let waiting = common::eventually(std::time::Duration::from_secs(10), || {
        let db = db.pool.clone();
        async move { (lock_waiters(&db).await > 0).then_some(()) }
    })
    .await;
    assert!(waiting.is_some(), "the sync waits for the workspace's lock");
    request.abort();
    let _ = request.await;
    holder.commit().await.unwrap();
    let renamed = common::eventually(std::time::Duration::from_secs(8), || {
        let db = db.pool.clone();
        async move {
            common::rows::workspace(&db, "org_console_gone")
                .await
                .filter(|w| w.name.as_deref() == Some("Acme Renamed"))
        }
    })
    .await;
    assert!(renamed.is_some(), "the abandoned sync ran to its end");
}
