//! Issue 19 item 16: a membership removal and the `user.deleted` of its user, in
//! either order, in separate concurrent transactions or in one batch, end the
//! membership at the earlier of their two times.
//!
//! The concurrent cases are made deterministic with a row lock: a test transaction
//! holds the member row while the two events start, in a chosen order, and queue
//! behind it; releasing it lets them run in that order, each having read what it
//! read before it queued.

use std::time::Duration;

use chrono::{DateTime, Utc};
use provisioner::provision::{Incoming, Provisioner};
use serde_json::json;
use sqlx::PgPool;

use super::{T0, apply_ok, provisioner};
use crate::common::database::{TestDatabase, lock_waiters};
use crate::common::story::{self, org, person, user_deleted};

/// How the membership removal is shaped.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// The full membership, `public_user_data` included.
    Full,
    /// Ids only: no `public_user_data`, organization `{id}` (it names no user).
    IdsOnly,
}

/// One membership of its own (ids suffixed with `n`), active, and its two ends.
struct Case {
    membership: String,
    removal: Incoming,
    user_gone: Incoming,
    /// The end that must stand: (ms, reason).
    expected: (i64, &'static str),
}

async fn case(
    p: &Provisioner,
    db: &PgPool,
    n: &str,
    shape: Shape,
    removal_first_in_time: bool,
) -> Case {
    let ws = format!("org_{n}");
    let user = format!("user_{n}");
    let membership = format!("mem_{n}");
    let acme = org(&ws).named("Acme").version(T0);
    let mem = acme.membership(&membership, &person(&user, "u")).since(T0);
    apply_ok(p, db, mem.created(T0)).await;
    let (removal_at, user_at) = if removal_first_in_time {
        (T0 + 100, T0 + 200)
    } else {
        (T0 + 200, T0 + 100)
    };
    let mut removal: story::Event = mem.deleted(T0).sent_at(removal_at);
    if let Shape::IdsOnly = shape {
        let (id, ws) = (membership.clone(), ws.clone());
        removal = removal.with(move |d| *d = json!({ "id": id, "organization": { "id": ws } }));
    }
    let expected = if removal_first_in_time {
        (removal_at, "membership_deleted")
    } else {
        (user_at, "user_deleted")
    };
    Case {
        membership,
        removal: removal.into(),
        user_gone: user_deleted(&user, user_at).into(),
        expected,
    }
}

async fn end_of(db: &PgPool, membership: &str) -> (i64, String) {
    let (at, reason): (Option<DateTime<Utc>>, Option<String>) =
        sqlx::query_as("select removed_at, removal_reason from members where membership_id = $1")
            .bind(membership)
            .fetch_one(db)
            .await
            .unwrap();
    (
        at.expect("the membership ended").timestamp_millis(),
        reason.unwrap(),
    )
}

async fn until_waiting(db: &PgPool, n: i64) {
    for _ in 0..500 {
        if lock_waiters(db).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} transactions never queued for the lock");
}

/// Applies `first` then `second`, each in its own transaction, both queued behind
/// a lock on `membership`'s row in that order, then releases them.
async fn race(p: &Provisioner, db: &PgPool, membership: &str, first: Incoming, second: Incoming) {
    let mut holder = db.begin().await.unwrap();
    sqlx::query("select 1 from members where membership_id = $1 for update")
        .bind(membership)
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (n, e) in [(1, first), (2, second)] {
        let (p, db2) = (p.clone(), db.clone());
        tasks.push(tokio::spawn(async move {
            p.apply_batch(&db2, &[e]).await.remove(0).expect("applies")
        }));
        until_waiting(db, n).await;
    }
    holder.commit().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
}

/// A removal (full, or ids only and so holding the workspace's lock alone) and
/// `user.deleted`, each earlier in time in turn, racing in separate transactions
/// in both orders: the earlier end stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_racing_user_deleted_keeps_the_earlier_end() {
    let db = TestDatabase::create_with_pool_size(8).await;
    let p = provisioner();
    let mut n = 0;
    for shape in [Shape::Full, Shape::IdsOnly] {
        for removal_first_in_time in [true, false] {
            for removal_queues_first in [true, false] {
                n += 1;
                let c = case(
                    &p,
                    &db.pool,
                    &format!("race{n}"),
                    shape,
                    removal_first_in_time,
                )
                .await;
                let (first, second) = if removal_queues_first {
                    (c.removal, c.user_gone)
                } else {
                    (c.user_gone, c.removal)
                };
                race(&p, &db.pool, &c.membership, first, second).await;
                let (at, reason) = end_of(&db.pool, &c.membership).await;
                assert_eq!(
                    (at, reason.as_str()),
                    c.expected,
                    "{shape:?}, removal earlier in time: {removal_first_in_time}, \
                     removal queued first: {removal_queues_first}"
                );
            }
        }
    }
}

/// The same pairs in one batch, in both orders: the earlier end stands.
#[tokio::test]
async fn a_removal_and_user_deleted_in_one_batch_keep_the_earlier_end() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let mut n = 0;
    for shape in [Shape::Full, Shape::IdsOnly] {
        for removal_first_in_time in [true, false] {
            for removal_first_in_batch in [true, false] {
                n += 1;
                let c = case(
                    &p,
                    &db.pool,
                    &format!("batch{n}"),
                    shape,
                    removal_first_in_time,
                )
                .await;
                let batch = if removal_first_in_batch {
                    [c.removal, c.user_gone]
                } else {
                    [c.user_gone, c.removal]
                };
                for r in p.apply_batch(&db.pool, &batch).await {
                    r.expect("applies");
                }
                let (at, reason) = end_of(&db.pool, &c.membership).await;
                assert_eq!(
                    (at, reason.as_str()),
                    c.expected,
                    "{shape:?}, removal earlier in time: {removal_first_in_time}, \
                     removal first in the batch: {removal_first_in_batch}"
                );
            }
        }
    }
}

/// Issue 19 item 13 under concurrency: a workspace's deletion or a removal naming
/// no user (each holding the workspace's lock only) ends a row while an older
/// `user.updated` of its user (holding the user's lock only) is being applied; the
/// update is held at its first write by a test transaction until the end has had
/// its chance to run. The row ends showing that update, the best source not after
/// its end, not the membership's older snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_end_racing_an_older_user_update_falls_back_to_it() {
    let db = TestDatabase::create_with_pool_size(8).await;
    let p = provisioner();
    for (n, ids_only) in [(1, false), (2, true)] {
        let (ws, user, id) = (
            format!("org_f{n}"),
            format!("user_f{n}"),
            format!("mem_f{n}"),
        );
        let acme = org(&ws).named("Acme").version(T0);
        let mem = acme.membership(&id, &person(&user, "snap")).since(T0);
        apply_ok(&p, &db.pool, mem.created(T0)).await;
        apply_ok(
            &p,
            &db.pool,
            story::user_updated(&person(&user, "after"), T0 + 20),
        )
        .await;
        let end: Incoming = if ids_only {
            let (id, ws) = (id.clone(), ws.clone());
            mem.deleted(T0)
                .sent_at(T0 + 10)
                .with(move |d| *d = json!({ "id": id, "organization": { "id": ws } }))
                .into()
        } else {
            acme.deleted(T0 + 10).into()
        };
        let svix = format!("msg_before_{n}");
        let before: Incoming = story::user_updated(&person(&user, "before"), T0 + 5)
            .svix(&svix)
            .into();
        // The holder's copy of the update's kept snapshot makes the update wait.
        let mut holder = db.pool.begin().await.unwrap();
        sqlx::query("insert into user_profiles (user_id, version, svix_id) values ($1, $2, $3)")
            .bind(&user)
            .bind(T0 + 5)
            .bind(&svix)
            .execute(&mut *holder)
            .await
            .unwrap();
        let (p1, db1) = (p.clone(), db.pool.clone());
        let update = tokio::spawn(async move { p1.apply_batch(&db1, &[before]).await.remove(0) });
        until_waiting(&db.pool, 1).await;
        let (p2, db2) = (p.clone(), db.pool.clone());
        let ending = tokio::spawn(async move { p2.apply_batch(&db2, &[end]).await.remove(0) });
        // The end either runs through now or queues behind the update.
        for _ in 0..300 {
            if ending.is_finished() || lock_waiters(&db.pool).await >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        holder.rollback().await.unwrap();
        update.await.unwrap().expect("the update applies");
        ending.await.unwrap().expect("the end applies");
        let (email, reason): (Option<String>, Option<String>) =
            sqlx::query_as("select email, removal_reason from members where membership_id = $1")
                .bind(&id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert!(reason.is_some(), "ended");
        assert_eq!(
            email.as_deref(),
            Some(format!("{user}.before@example.com").as_str()),
            "ids only: {ids_only}"
        );
    }
}
