//! Reconciliation against a local fake of Clerk's Backend API and a real
//! PostgreSQL: backfill, each kind of drift and its repair, dry runs, the proofs
//! deletions need, version gates, the removal budget, and the CLI's report.

// The proofs removals need (issue 19 items 4 and 5), in a file of their own.
mod proofs;

use crate::common;
use crate::common::Isolation;
use crate::common::database::TestDatabase;
use crate::common::ops::{config_file, run_binary, stderr, stdout};
use crate::common::rows::{member, quotas, workspace};
use crate::common::story::{org, person};
use provisioner::clerk::api::ClerkApi;
use provisioner::clerk::fake::FakeClerk;
use provisioner::config::{Secret, Settings};
use provisioner::progress::Silent;
use provisioner::provision::{Incoming, Provisioner};
use provisioner::reconcile::{DriftKind, Found, Reconciler, Report, RunOptions};
use serde_json::Value;
use sqlx::PgPool;

const KEY: &str = "sk_test_reconcile_fake_key_abcdef";
const T0: i64 = 1_750_000_000_000;

fn settings(fake: &FakeClerk, extra: &str) -> Settings {
    let mut s = Settings::from_sources(Some(extra), |_| None).expect("valid settings");
    s.clerk.secret_key = Some(Secret::new(fake.key.clone()));
    s.clerk.api_url = fake.url.clone();
    s.reconcile.requests_per_second = 0.0;
    s
}

fn reconciler(fake: &FakeClerk, db: &PgPool, extra: &str) -> Reconciler {
    let s = settings(fake, extra);
    let api = ClerkApi::new(&s.clerk, &s.reconcile).unwrap();
    Reconciler::new(
        api,
        Provisioner::new(s.provisioning),
        db.clone(),
        s.reconcile.max_removals,
    )
}

async fn run(r: &Reconciler, dry_run: bool) -> Report {
    r.run(
        &RunOptions {
            dry_run,
            yes: false,
        },
        &Silent,
    )
    .await
    .expect("reconcile runs")
}

async fn apply(db: &PgPool, events: Vec<Incoming>) {
    let p = Provisioner::new(Settings::from_sources(None, |_| None).unwrap().provisioning);
    for result in p.apply_batch(db, &events).await {
        result.expect("webhook applies");
    }
}

fn kinds(report: &Report) -> Vec<(DriftKind, String, Option<String>)> {
    let mut k: Vec<_> = report
        .drift
        .iter()
        .map(|d| (d.kind, d.workspace_id.clone(), d.user_id.clone()))
        .collect();
    k.sort();
    k
}

/// A world of `orgs` organizations with `per_org` members each in the fake.
fn populate(fake: &FakeClerk, orgs: usize, per_org: usize) {
    for i in 0..orgs {
        let o = org(&format!("org_b{i:05}")).version(T0 + i as i64);
        fake.put_organization(o.data_at(T0 + i as i64));
        for j in 0..per_org {
            let p = person(&format!("user_b{i:05}_{j}"), "x");
            let m = o.membership(&format!("orgmem_b{i:05}_{j}"), &p);
            let m = if j == 0 { m.role("org:admin") } else { m };
            fake.put_membership(m.data_at(T0 + 10 + j as i64));
        }
    }
}

/// Every row of the tables reconcile may write, for before/after comparisons.
async fn snapshot(db: &PgPool) -> Vec<String> {
    let mut all = Vec::new();
    for table in [
        "workspaces",
        "workspace_quotas",
        "onboarding_steps",
        "members",
        "audit_log",
        "events",
        "users",
    ] {
        let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select t::text from {table} t order by t::text"
        )))
        .fetch_all(db)
        .await
        .unwrap();
        all.extend(rows.into_iter().map(|(r,)| format!("{table}: {r}")));
    }
    all
}

/// Reconcile backfills an empty database from Clerk lists longer than one page.
#[tokio::test]
async fn backfill_from_an_empty_database_over_several_pages() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    // More than one page of 500 organizations and of memberships.
    populate(&fake, 520, 2);
    let r = reconciler(&fake, &db.pool, "");
    let report = run(&r, false).await;
    assert_eq!(report.organizations_seen, 520);
    assert_eq!(report.memberships_seen, 1040);
    let counts = report.counts();
    assert_eq!(counts.get(&DriftKind::WorkspaceMissing), Some(&520));
    assert_eq!(counts.get(&DriftKind::MemberMissing), Some(&1040));
    assert_eq!(report.applied, 520 + 1040);
    let active: i64 = sqlx::query_scalar("select count(*) from workspaces where status = 'active'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(active, 520);
    let admin = member(&db.pool, "orgmem_b00519_0")
        .await
        .expect("member provisioned");
    assert_eq!((admin.role.as_str(), admin.removed), ("admin", false));
    let actors: Vec<String> = sqlx::query_scalar("select distinct actor from audit_log")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(actors, vec!["reconcile".to_owned()]);

    // A second run finds nothing and changes nothing.
    let before = snapshot(&db.pool).await;
    let again = run(&r, false).await;
    assert!(
        again.drift.is_empty(),
        "{:?}",
        &again.drift[..again.drift.len().min(5)]
    );
    assert_eq!(again.applied, 0);
    assert_eq!(snapshot(&db.pool).await, before);
}

/// Each kind of drift (stale, gone, conflict, members promoted, missing or new, a new
/// organization) is reported and repaired.
#[tokio::test]
async fn each_kind_of_drift_is_reported_and_repaired() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let jane = person("user_jane", "j");
    let bob = person("user_bob", "b");
    let carl = person("user_carl", "c");

    // Here: stale (old name, team plan), gone, conflict (deleted here), members.
    let stale = org("org_stale").named("Old Name").version(T0);
    let gone = org("org_gone").version(T0);
    let conflict = org("org_conflict").version(T0);
    let quota = org("org_quota").plan("team").version(T0);
    let role = stale.membership("orgmem_role", &jane).role("org:member");
    let extra = stale.membership("orgmem_extra", &bob);
    apply(
        &db.pool,
        vec![
            stale.created(T0).incoming(),
            gone.created(T0).incoming(),
            conflict.created(T0).incoming(),
            conflict.deleted(T0 + 5).incoming(),
            quota.created(T0).incoming(),
            role.created(T0 + 1).incoming(),
            extra.created(T0 + 1).incoming(),
        ],
    )
    .await;

    // Clerk: stale renamed and on enterprise, gone absent, conflict present,
    // jane promoted, bob absent, carl new; a new organization.
    let renamed = org("org_stale")
        .named("New Name")
        .plan("enterprise")
        .version(T0 + 100);
    fake.put_organization(renamed.data_at(T0 + 100));
    fake.put_organization(conflict.data_at(T0 + 100));
    fake.put_organization(quota.data_at(T0));
    fake.put_organization(org("org_new").data_at(T0 + 100));
    fake.put_membership(
        renamed
            .membership("orgmem_role", &jane)
            .role("org:admin")
            .data_at(T0 + 100),
    );
    fake.put_membership(
        renamed
            .membership("orgmem_missing", &carl)
            .data_at(T0 + 100),
    );

    // The team plan's limits changed in config since org_quota was provisioned.
    // (A `[plans]` table in a config file replaces the default one whole.)
    let extra_config = "\
        [plans.free]\nseats = 5\nanalyses_per_month = 20\nreports = 10\nschedules = 2\nretention_days = 30\ngong_credentials = 1\n\
        [plans.team]\nseats = 30\nanalyses_per_month = 500\nreports = 100\nschedules = 20\nretention_days = 365\ngong_credentials = 3\n\
        [plans.enterprise]\nseats = 1000\nanalyses_per_month = 100000\nreports = 10000\nschedules = 1000\nretention_days = 2555\ngong_credentials = 50\n";
    let r = reconciler(&fake, &db.pool, extra_config);

    let before = snapshot(&db.pool).await;
    let dry = run(&r, true).await;
    assert_eq!(
        snapshot(&db.pool).await,
        before,
        "a dry run changes nothing"
    );
    assert!(dry.dry_run);
    assert_eq!(dry.applied, 0);
    let expected = vec![
        (DriftKind::WorkspaceMissing, "org_new".to_owned(), None),
        (DriftKind::WorkspaceStale, "org_stale".to_owned(), None),
        (DriftKind::WorkspaceGone, "org_gone".to_owned(), None),
        (
            DriftKind::WorkspaceConflict,
            "org_conflict".to_owned(),
            None,
        ),
        (
            DriftKind::MemberMissing,
            "org_stale".to_owned(),
            Some("user_carl".to_owned()),
        ),
        (
            DriftKind::MemberExtra,
            "org_stale".to_owned(),
            Some("user_bob".to_owned()),
        ),
        (
            DriftKind::MemberRole,
            "org_stale".to_owned(),
            Some("user_jane".to_owned()),
        ),
        (DriftKind::QuotasStale, "org_quota".to_owned(), None),
    ];
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(kinds(&dry), sorted);

    let report = run(&r, false).await;
    assert_eq!(kinds(&report), sorted, "the real run finds the same drift");
    let ws = workspace(&db.pool, "org_stale").await.unwrap();
    assert_eq!(
        (ws.name.as_deref(), ws.plan.as_str()),
        (Some("New Name"), "enterprise")
    );
    assert_eq!(
        workspace(&db.pool, "org_gone").await.unwrap().status,
        "deleted"
    );
    assert_eq!(
        workspace(&db.pool, "org_conflict").await.unwrap().status,
        "deleted",
        "tombstones are final"
    );
    assert_eq!(
        workspace(&db.pool, "org_new").await.unwrap().status,
        "active"
    );
    assert_eq!(member(&db.pool, "orgmem_role").await.unwrap().role, "admin");
    let bob_row = member(&db.pool, "orgmem_extra").await.unwrap();
    assert!(bob_row.removed);
    assert!(!member(&db.pool, "orgmem_missing").await.unwrap().removed);
    let seats = quotas(&db.pool, "org_quota")
        .await
        .into_iter()
        .find(|(n, _)| n == "seats")
        .unwrap();
    assert_eq!(seats.1, 30);

    // Converged: nothing left but the conflict, which is never repaired.
    let after = run(&r, false).await;
    assert_eq!(
        kinds(&after),
        vec![(
            DriftKind::WorkspaceConflict,
            "org_conflict".to_owned(),
            None
        )]
    );
}

/// A workspace missing from Clerk's list is tombstoned only after `GET` of it answers 404.
#[tokio::test]
async fn a_workspace_is_tombstoned_only_after_its_404() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let a = org("org_hidden").version(T0);
    apply(&db.pool, vec![a.created(T0).incoming()]).await;
    // The list misses it (a scan is not a snapshot), but GET finds it: no removal.
    fake.put_organization(a.data_at(T0));
    fake.hide_from_list("org_hidden");
    let r = reconciler(&fake, &db.pool, "");
    let report = run(&r, false).await;
    assert!(report.drift.is_empty(), "{:?}", report.drift);
    assert_eq!(
        workspace(&db.pool, "org_hidden").await.unwrap().status,
        "active"
    );
    assert!(
        fake.requests()
            .iter()
            .any(|q| q.path == "/v1/organizations/org_hidden"),
        "the missing one was looked up"
    );

    // Now gone from Clerk: GET answers 404, and only then it is tombstoned.
    fake.delete_organization("org_hidden");
    let report = run(&r, false).await;
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::WorkspaceGone, "org_hidden".to_owned(), None)]
    );
    assert_eq!(
        workspace(&db.pool, "org_hidden").await.unwrap().status,
        "deleted"
    );
}

/// A membership created while the scan runs is not removed.
#[tokio::test]
async fn a_membership_created_during_the_scan_is_not_removed() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let a = org("org_scan").version(T0);
    fake.put_organization(a.data_at(T0));
    apply(&db.pool, vec![a.created(T0).incoming()]).await;
    let r = reconciler(&fake, &db.pool, "");

    // Hold the membership list; meanwhile a webhook adds a member Clerk's (older)
    // answer will not list.
    let (reached, release) = fake.gate("/v1/organization_memberships");
    let run = tokio::spawn(async move { r.run(&RunOptions::default(), &Silent).await });
    reached.await.unwrap();
    let late = a.membership("orgmem_late", &person("user_late", "l"));
    apply(&db.pool, vec![late.created(T0 + 50).incoming()]).await;
    release.send(()).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(report.drift.is_empty(), "{:?}", report.drift);
    assert!(
        !member(&db.pool, "orgmem_late").await.unwrap().removed,
        "the webhook's member survives"
    );
}

/// An older Clerk snapshot never overwrites what a newer webhook stored.
#[tokio::test]
async fn an_older_snapshot_never_overwrites_a_newer_webhook() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let jane = person("user_jane", "j");
    let newer = org("org_race").named("Newer").version(T0 + 200);
    apply(
        &db.pool,
        vec![
            newer.created(T0 + 200).incoming(),
            newer
                .membership("orgmem_race", &jane)
                .role("org:admin")
                .created(T0 + 200)
                .incoming(),
        ],
    )
    .await;
    // Clerk's answer was taken before the webhook's change: older data.
    let older = org("org_race").named("Older").version(T0 + 100);
    fake.put_organization(older.data_at(T0 + 100));
    fake.put_membership(
        older
            .membership("orgmem_race", &jane)
            .role("org:member")
            .data_at(T0 + 100),
    );
    let r = reconciler(&fake, &db.pool, "");
    let report = run(&r, false).await;
    assert!(
        report.drift.is_empty(),
        "older snapshots are no drift: {:?}",
        report.drift
    );
    assert_eq!(
        workspace(&db.pool, "org_race")
            .await
            .unwrap()
            .name
            .as_deref(),
        Some("Newer")
    );
    assert_eq!(member(&db.pool, "orgmem_race").await.unwrap().role, "admin");
}

/// Syncing one organization provisions it; once Clerk no longer has it, the sync
/// proves it gone and ends its memberships.
#[tokio::test]
async fn sync_one_provisions_and_proves_a_deletion() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let a = org("org_jit").version(T0);
    fake.put_organization(a.data_at(T0));
    fake.put_membership(
        a.membership("orgmem_jit", &person("user_jit", "j"))
            .role("org:admin")
            .data_at(T0),
    );
    let r = reconciler(&fake, &db.pool, "");
    let (report, found) = r.sync_one("org_jit", &RunOptions::default()).await.unwrap();
    assert_eq!(found, Found::Present);
    assert_eq!(report.applied, 2);
    assert_eq!(member(&db.pool, "orgmem_jit").await.unwrap().role, "admin");

    fake.delete_organization("org_jit");
    let (report, found) = r.sync_one("org_jit", &RunOptions::default()).await.unwrap();
    assert_eq!(found, Found::Gone);
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::WorkspaceGone, "org_jit".to_owned(), None)]
    );
    assert_eq!(
        workspace(&db.pool, "org_jit").await.unwrap().status,
        "deleted"
    );
    assert!(member(&db.pool, "orgmem_jit").await.unwrap().removed);
}

/// The CLI: `--json` document, removal budget, `--yes`, and a wrong key.
#[tokio::test]
async fn the_cli_reports_refuses_past_max_removals_and_fails_on_a_wrong_key() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    // Three workspaces here that Clerk no longer has.
    let mut events = Vec::new();
    for i in 0..3 {
        events.push(org(&format!("org_old{i}")).created(T0).incoming());
    }
    apply(&db.pool, events).await;
    let iso = Isolation::new();
    let config = config_file(
        &iso,
        "[reconcile]\nmax_removals = 2\nrequests_per_second = 0\n",
    );
    let env = |key: &str| {
        vec![
            (
                "DATABASE_URL",
                format!("{}/{}", common::base_database_url(), db.name),
            ),
            ("CLERK_API_URL", fake.url.clone()),
            ("CLERK_SECRET_KEY", key.to_owned()),
        ]
    };

    let out = run_binary(&config, &env(KEY), &["reconcile", "--json"]).await;
    assert!(
        !out.status.success(),
        "3 removals > max_removals 2 without --yes"
    );
    let doc: Value = serde_json::from_str(&stdout(&out)).expect("one JSON document");
    assert_eq!(doc["dry_run"], false);
    assert_eq!(doc["organizations_seen"], 0);
    assert_eq!(doc["applied"], 0);
    assert_eq!(doc["drift"].as_array().unwrap().len(), 3);
    assert_eq!(doc["drift"][0]["kind"], "workspace_gone");
    assert!(doc["drift"][0]["user_id"].is_null());
    assert!(stderr(&out).contains("max_removals"), "{}", stderr(&out));
    assert_eq!(
        workspace(&db.pool, "org_old0").await.unwrap().status,
        "active"
    );

    let out = run_binary(&config, &env(KEY), &["reconcile", "--yes"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .contains("seen 0 organizations, 0 memberships; drift: 3 workspace_gone; applied: 3"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        workspace(&db.pool, "org_old0").await.unwrap().status,
        "deleted"
    );

    let wrong = "sk_test_this_key_is_wrong_0000";
    let out = run_binary(&config, &env(wrong), &["reconcile"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("CLERK_SECRET_KEY was refused"), "{err}");
    assert!(!err.contains(wrong) && !stdout(&out).contains(wrong));
}
