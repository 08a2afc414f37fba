//! The proofs a removal needs (issue 19 items 4 and 5): lists that shift while
//! they are paged, a GET that cannot find what exists, and a key of another
//! instance never cost anyone still in Clerk their access.

use super::*;
use common::fake_clerk::{Change, INSTANCE_ID};

/// An organization of `n` members in the fake, listed oldest first in the order
/// of their number (`orgmem_big_0000` … ), each a member here too once applied.
fn big_org(fake: &FakeClerk, id: &str, n: usize) {
    let o = org(id).version(T0);
    fake.put_organization(o.data_at(T0));
    for j in 0..n {
        let p = person(&format!("user_{id}_{j:04}"), "b");
        let m = o
            .membership(&format!("orgmem_{id}_{j:04}"), &p)
            .since(T0 + j as i64);
        fake.put_membership(m.data_at(T0 + j as i64));
    }
}

async fn active_members(db: &PgPool, workspace: &str) -> Vec<String> {
    sqlx::query_scalar(
        "select membership_id from members \
         where workspace_id = $1 and removed_at is null order by membership_id",
    )
    .bind(workspace)
    .fetch_all(db)
    .await
    .unwrap()
}

fn reconciler_of(fake: &FakeClerk, db: &PgPool, instance_id: Option<&str>) -> Reconciler {
    let mut s = settings(fake, "");
    s.clerk.instance_id = instance_id.map(str::to_owned);
    let api = ClerkApi::new(&s.clerk, &s.reconcile).unwrap();
    Reconciler::new(
        api,
        Provisioner::new(s.provisioning),
        db.clone(),
        s.reconcile.max_removals,
    )
}

/// A full run whose membership lists shift between pages (one membership leaves
/// while the instance's list is paged, another while the organization's would
/// be) removes no one still in Clerk; the next run removes the one that left.
#[tokio::test]
async fn a_full_run_never_removes_a_member_a_shifting_list_missed() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    big_org(&fake, "org_big", 502);
    let r = reconciler(&fake, &db.pool, "");
    run(&r, false).await;
    assert_eq!(active_members(&db.pool, "org_big").await.len(), 502);

    fake.before_page(
        "/v1/organization_memberships",
        500,
        Change::DeleteMembership("orgmem_org_big_0010".into()),
    );
    fake.before_page(
        "/v1/organizations/org_big/memberships",
        500,
        Change::DeleteMembership("orgmem_org_big_0020".into()),
    );
    let report = run(&r, false).await;
    assert!(
        !report.counts().contains_key(&DriftKind::MemberExtra),
        "{:?}",
        report.drift
    );
    assert_eq!(
        active_members(&db.pool, "org_big").await.len(),
        502,
        "nobody lost access (the two that left are for their webhooks or the next run)"
    );

    // The one that left while the list was paged is removed by the next run, on
    // Clerk's word (the second hook is never reached: no list is paged again).
    let report = run(&r, false).await;
    assert_eq!(
        kinds(&report),
        vec![(
            DriftKind::MemberExtra,
            "org_big".to_owned(),
            Some("user_org_big_0010".to_owned())
        )]
    );
    let active = active_members(&db.pool, "org_big").await;
    assert_eq!(active.len(), 501);
    assert!(!active.contains(&"orgmem_org_big_0010".to_owned()));
}

/// `reconcile --org` of a 501-member organization whose list shifts between its
/// two pages keeps the member at the page boundary (asked again by user id).
#[tokio::test]
async fn reconcile_org_never_removes_the_member_at_a_shifted_page_boundary() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    big_org(&fake, "org_edge", 501);
    let r = reconciler(&fake, &db.pool, "");
    r.sync_one("org_edge", &RunOptions::default())
        .await
        .unwrap();
    assert_eq!(active_members(&db.pool, "org_edge").await.len(), 501);

    fake.before_page(
        "/v1/organizations/org_edge/memberships",
        500,
        Change::DeleteMembership("orgmem_org_edge_0007".into()),
    );
    let (report, found) = r
        .sync_one("org_edge", &RunOptions::default())
        .await
        .unwrap();
    assert_eq!(found, Found::Present);
    assert!(report.drift.is_empty(), "{:?}", report.drift);
    let boundary = member(&db.pool, "orgmem_org_edge_0500").await.unwrap();
    assert!(
        !boundary.removed,
        "the member at the page boundary kept access"
    );
    let asked = fake
        .requests()
        .into_iter()
        .filter(|q| q.query.contains("user_id=user_org_edge_0500"))
        .count();
    assert_eq!(asked, 1, "the missing one was asked about by its user");

    // The one that left is removed by the next sync, on Clerk's word.
    let (report, _) = r
        .sync_one("org_edge", &RunOptions::default())
        .await
        .unwrap();
    assert_eq!(
        kinds(&report),
        vec![(
            DriftKind::MemberExtra,
            "org_edge".to_owned(),
            Some("user_org_edge_0007".to_owned())
        )]
    );
    assert!(
        member(&db.pool, "orgmem_org_edge_0007")
            .await
            .unwrap()
            .removed
    );
}

/// A full run whose organization list shifts between pages (one organization is
/// deleted while it is paged) removes no workspace Clerk still has.
#[tokio::test]
async fn a_full_run_never_removes_a_workspace_a_shifting_list_missed() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    populate(&fake, 501, 0);
    let r = reconciler(&fake, &db.pool, "");
    run(&r, false).await;
    fake.before_page(
        "/v1/organizations",
        500,
        Change::DeleteOrganization("org_b00010".into()),
    );
    let report = run(&r, false).await;
    assert!(report.drift.is_empty(), "{:?}", report.drift);
    assert_eq!(
        workspace(&db.pool, "org_b00500").await.unwrap().status,
        "active",
        "the organization at the page boundary was looked up, not removed"
    );
    // The deleted one was listed before it went: its webhook (or the next run,
    // with Clerk's 404) removes it.
    let report = run(&r, false).await;
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::WorkspaceGone, "org_b00010".to_owned(), None)]
    );
}

/// `reconcile --org`: one 404 by id is not proof while Clerk still lists the
/// organization; the workspace is compared, not removed.
#[tokio::test]
async fn reconcile_org_needs_the_listing_to_agree_with_a_404() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let a = org("org_flaky").version(T0);
    apply(&db.pool, vec![a.created(T0).incoming()]).await;
    fake.put_organization(org("org_flaky").named("Renamed").data_at(T0 + 10));
    fake.unfindable_by_id("org_flaky");
    let r = reconciler(&fake, &db.pool, "");
    let (report, found) = r
        .sync_one("org_flaky", &RunOptions::default())
        .await
        .unwrap();
    assert_eq!(found, Found::Present);
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::WorkspaceStale, "org_flaky".to_owned(), None)]
    );
    let ws = workspace(&db.pool, "org_flaky").await.unwrap();
    assert_eq!(
        (ws.status.as_str(), ws.name.as_deref()),
        ("active", Some("Renamed"))
    );
}

/// `reconcile --org` of an organization Clerk neither lists nor finds removes
/// the workspace, and that removal counts toward `max_removals`.
#[tokio::test]
async fn reconcile_org_removal_counts_toward_max_removals() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    apply(&db.pool, vec![org("org_gone1").created(T0).incoming()]).await;
    let r = reconciler(&fake, &db.pool, "[reconcile]\nmax_removals = 0\n");
    let (report, found) = r
        .sync_one("org_gone1", &RunOptions::default())
        .await
        .unwrap();
    assert_eq!(found, Found::Gone);
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::WorkspaceGone, "org_gone1".to_owned(), None)]
    );
    assert!(report.refused.is_some(), "1 removal > max_removals 0");
    assert_eq!(
        workspace(&db.pool, "org_gone1").await.unwrap().status,
        "active"
    );
    let yes = RunOptions {
        dry_run: false,
        yes: true,
    };
    r.sync_one("org_gone1", &yes).await.unwrap();
    assert_eq!(
        workspace(&db.pool, "org_gone1").await.unwrap().status,
        "deleted"
    );
}

/// A key of another instance than `CLERK_INSTANCE_ID` is refused before anything
/// is compared, by the full run (dry run too) and `--org` alike; the key of the
/// configured instance, or an API without `GET /v1/instance`, is not.
#[tokio::test]
async fn a_key_of_another_instance_is_refused_before_any_repair() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    apply(&db.pool, vec![org("org_prod").created(T0).incoming()]).await;
    let before = snapshot(&db.pool).await;
    let wrong = reconciler_of(&fake, &db.pool, Some("ins_production"));
    for dry_run in [true, false] {
        let opts = RunOptions { dry_run, yes: true };
        let err = wrong.run(&opts, &Silent).await.unwrap_err().to_string();
        assert!(
            err.contains("CLERK_SECRET_KEY") && err.contains("CLERK_INSTANCE_ID"),
            "{err}"
        );
        let err = wrong.sync_one("org_prod", &opts).await.unwrap_err();
        assert!(err.to_string().contains("CLERK_INSTANCE_ID"), "{err}");
    }
    assert_eq!(snapshot(&db.pool).await, before, "nothing changed");
    let lists = fake
        .requests()
        .into_iter()
        .filter(|q| q.path.starts_with("/v1/organizations"))
        .count();
    assert_eq!(lists, 0, "nothing was even asked");

    let right = reconciler_of(&fake, &db.pool, Some(INSTANCE_ID));
    let report = run(&right, false).await;
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::WorkspaceGone, "org_prod".to_owned(), None)]
    );

    apply(&db.pool, vec![org("org_prod2").created(T0).incoming()]).await;
    fake.set_instance(None);
    let unknown = reconciler_of(&fake, &db.pool, Some("ins_production"));
    let (_, found) = unknown
        .sync_one("org_prod2", &RunOptions::default())
        .await
        .unwrap();
    assert_eq!(
        found,
        Found::Gone,
        "an API without /v1/instance does not block"
    );
}

/// The CLI refuses a key of another instance with one line naming both
/// settings, exits non-zero, and changes nothing (full run and `--org`).
#[tokio::test]
async fn the_cli_refuses_a_key_of_another_instance() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    apply(&db.pool, vec![org("org_cli_prod").created(T0).incoming()]).await;
    let iso = Isolation::new();
    let config = config_file(&iso, "[reconcile]\nrequests_per_second = 0\n");
    let env = vec![
        (
            "DATABASE_URL",
            format!("{}/{}", common::base_database_url(), db.name),
        ),
        ("CLERK_API_URL", fake.url.clone()),
        ("CLERK_SECRET_KEY", KEY.to_owned()),
        ("CLERK_INSTANCE_ID", "ins_production".to_owned()),
    ];
    for args in [
        &["reconcile", "--yes"][..],
        &["reconcile", "--org", "org_cli_prod", "--yes"][..],
    ] {
        let out = run_binary(&config, &env, args).await;
        assert!(!out.status.success(), "{args:?}");
        let line = common::ops::error_line(&out);
        assert!(
            line.contains("CLERK_SECRET_KEY") && line.contains("CLERK_INSTANCE_ID"),
            "{line}"
        );
        assert!(!stderr(&out).contains(KEY));
    }
    assert_eq!(
        workspace(&db.pool, "org_cli_prod").await.unwrap().status,
        "active"
    );
}
