//! The proofs a removal needs (issue 19 items 4 and 5): lists that shift while
//! they are paged, a GET that cannot find what exists, and a key of another
//! instance never cost anyone still in Clerk their access.

use super::*;
use provisioner::clerk::fake::{Change, INSTANCE_ID};

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

/// What reconcile removed on inference is not a tombstone: when Clerk lists the
/// membership (or the organization) again, the next run restores it; a removal
/// Clerk made stays final. Passes once provisioning stores reconcile's removals
/// as inferences (issue 19, the provisioning side of items 4 and 5).
#[tokio::test]
async fn what_reconcile_removed_on_inference_is_restored_when_clerk_lists_it() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let o = org("org_back").version(T0);
    let ada = o
        .membership("orgmem_back_ada", &person("user_back_ada", "a"))
        .role("org:admin");
    let bob = o.membership("orgmem_back_bob", &person("user_back_bob", "b"));
    let put_all = || {
        fake.put_organization(o.data_at(T0));
        fake.put_membership(ada.data_at(T0));
        fake.put_membership(bob.data_at(T0));
    };
    put_all();
    let r = reconciler(&fake, &db.pool, "");
    run(&r, false).await;

    // Clerk's answers lack Bob for a while: a run removes him on inference.
    fake.delete_membership("orgmem_back_bob");
    run(&r, false).await;
    assert!(member(&db.pool, "orgmem_back_bob").await.unwrap().removed);
    fake.put_membership(bob.data_at(T0));
    let report = run(&r, false).await;
    assert_eq!(
        kinds(&report),
        vec![(
            DriftKind::MemberMissing,
            "org_back".to_owned(),
            Some("user_back_bob".to_owned())
        )]
    );
    assert!(!member(&db.pool, "orgmem_back_bob").await.unwrap().removed);

    // The same for the organization, with its members.
    fake.delete_organization("org_back");
    run(&r, false).await;
    assert_eq!(
        workspace(&db.pool, "org_back").await.unwrap().status,
        "deleted"
    );
    put_all();
    let report = run(&r, false).await;
    assert!(
        kinds(&report).contains(&(DriftKind::WorkspaceMissing, "org_back".to_owned(), None)),
        "{:?}",
        report.drift
    );
    assert_eq!(
        workspace(&db.pool, "org_back").await.unwrap().status,
        "active"
    );
    for m in ["orgmem_back_ada", "orgmem_back_bob"] {
        assert!(!member(&db.pool, m).await.unwrap().removed, "{m}");
    }
    assert!(run(&r, false).await.drift.is_empty(), "converged");

    // Clerk's own deletion is final: reported, never restored.
    apply(&db.pool, vec![o.deleted(T0 + 1_000).incoming()]).await;
    let report = run(&r, false).await;
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::WorkspaceConflict, "org_back".to_owned(), None)]
    );
    assert_eq!(
        workspace(&db.pool, "org_back").await.unwrap().status,
        "deleted"
    );
}

/// Reconcile's half of the restore, on its own: a membership removed with an
/// inferred reason, and a workspace whose deletion is marked inferred (as
/// provisioning records reconcile's removals), are reported as missing and get a
/// snapshot of their own (a fresh svix id per removal); a removal Clerk made is
/// reported only.
#[tokio::test]
async fn reconcile_sends_a_snapshot_for_what_was_removed_on_inference() {
    let db = TestDatabase::create().await;
    let fake = FakeClerk::start(KEY).await;
    let kept = org("org_inferred").version(T0);
    let real = org("org_real").version(T0);
    let bob = kept.membership("orgmem_inf_bob", &person("user_inf_bob", "b"));
    let eve = kept.membership("orgmem_inf_eve", &person("user_inf_eve", "e"));
    for o in [&kept, &real] {
        fake.put_organization(o.data_at(T0));
    }
    fake.put_membership(bob.data_at(T0));
    fake.put_membership(eve.data_at(T0));
    apply(
        &db.pool,
        vec![
            kept.created(T0).incoming(),
            real.created(T0).incoming(),
            bob.created(T0).incoming(),
            eve.created(T0).incoming(),
            eve.deleted(T0 + 5).incoming(),
        ],
    )
    .await;
    // Bob was removed on inference; org_inferred too (as provisioning marks it:
    // the schema is widened here as its migration does).
    sqlx::query("alter table members drop constraint if exists members_removal_reason_check")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "update members set removed_at = now(), removal_reason = 'not_in_clerk' \
         where membership_id = 'orgmem_inf_bob'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("alter table workspaces add column if not exists deletion_inferred boolean")
        .execute(&db.pool)
        .await
        .unwrap();
    apply(&db.pool, vec![real.deleted(T0 + 5).incoming()]).await;
    sqlx::query(
        "update workspaces set status = 'deleted', deleted_at = now(), deleted_version = 1, \
                deletion_inferred = true \
         where id = 'org_inferred'",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let r = reconciler(&fake, &db.pool, "");
    let dry = run(&r, true).await;
    let mut expected = vec![
        (DriftKind::WorkspaceMissing, "org_inferred".to_owned(), None),
        (DriftKind::WorkspaceConflict, "org_real".to_owned(), None),
        (
            DriftKind::MemberMissing,
            "org_inferred".to_owned(),
            Some("user_inf_bob".to_owned()),
        ),
        (
            DriftKind::MemberMissing,
            "org_inferred".to_owned(),
            Some("user_inf_eve".to_owned()),
        ),
    ];
    expected.sort();
    assert_eq!(kinds(&dry), expected);
    let detail = |user: &str| {
        dry.drift
            .iter()
            .find(|d| d.user_id.as_deref() == Some(user))
            .unwrap()
            .detail
            .clone()
    };
    assert!(
        detail("user_inf_bob").contains("restored"),
        "{}",
        detail("user_inf_bob")
    );
    assert!(
        detail("user_inf_eve").contains("final"),
        "{}",
        detail("user_inf_eve")
    );

    run(&r, false).await;
    let mut restores: Vec<String> = sqlx::query_scalar(
        "select svix_id from events where svix_id like 'reconcile_restore_%' order by svix_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    restores.sort();
    assert_eq!(restores.len(), 2, "{restores:?}");
    assert!(restores[0].starts_with("reconcile_restore_mem_orgmem_inf_bob_"));
    assert!(restores[1].starts_with("reconcile_restore_org_org_inferred_1_"));
}
