//! `provisioner dlq`: list, show, replay and purge dead letters against a real
//! RabbitMQ, with dead letters injected by the test (DESIGN §1, §4).

use std::time::Duration;

use crate::common::children::Process;
use crate::common::ops::*;
use crate::common::*;
use lapin::options::{BasicGetOptions, BasicRejectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use provisioner::dead_letters::{self as dlq, DeadQueue, DlqError, ReplayOptions, Selection};
use provisioner::progress::Silent;

fn id() -> String {
    format!("msg_{}", random_id(20))
}

/// Dead letters of every kind: worker-made (payload, retries exhausted), made by
/// RabbitMQ's delivery limit (x-death only), and put there by hand.
fn mixed(org: &str) -> (Vec<Inject>, Vec<String>) {
    let ids: Vec<String> = (0..4).map(|_| id()).collect();
    let msgs = vec![
        Inject::event("organizationMembership.created", org, &ids[0]).worker_headers(
            "payload",
            "data.public_user_data.user_id is missing",
            1,
            1_716_883_201_500,
        ),
        Inject::event("organization.updated", org, &ids[1]).worker_headers(
            "retries-exhausted",
            "database error: pool timed out",
            4,
            1_716_883_202_000,
        ),
        Inject::event("organization.created", "org_other", &ids[2])
            .x_death_only("t.provisioner.events", 1_716_883_203),
        Inject::event("user.deleted", org, &ids[3]),
    ];
    (msgs, ids)
}

/// Puts `n` dead `organization.created` events in the dead-letter queue, `msg_000`
/// (of `org_0`) first; returns their ids in order.
async fn inject_numbered(settings: &provisioner::config::Settings, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("msg_{i:03}")).collect();
    let msgs: Vec<Inject> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Inject::event("organization.created", &format!("org_{i}"), id))
        .collect();
    inject_dead(settings, &msgs).await;
    ids
}

/// Replays `selection` of the dead letters of `settings` (no progress shown); the
/// replay itself must succeed.
async fn replay(
    settings: &provisioner::config::Settings,
    selection: Selection,
) -> dlq::ReplayReport {
    dlq::replay(settings, &ReplayOptions::new(selection), &Silent)
        .await
        .unwrap()
}

/// `dlq list` shows each dead letter with its id, type and workspace, and leaves the queue
/// as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_each_dead_letter_and_leaves_the_queue_as_it_was() {
    // Arrange
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_list");
    inject_dead(&settings, &msgs).await;

    // Act
    let listing = dlq::list(&settings).await.unwrap();
    let again = dlq::list(&settings).await.unwrap();

    // Assert
    assert_eq!(listing.count, 4);
    let l = &listing.data;
    assert_eq!(
        l.iter().map(|l| l.id.clone().unwrap()).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(l[0].kind.as_deref(), Some("organizationMembership.created"));
    assert_eq!(l[0].workspace_id.as_deref(), Some("org_list"));
    assert_eq!(l[0].error_class.as_deref(), Some("payload"));
    assert_eq!(
        l[0].error.as_deref(),
        Some("data.public_user_data.user_id is missing")
    );
    assert_eq!(l[0].attempts, Some(1));
    assert_eq!(
        l[0].first_failed_at.unwrap().timestamp_millis(),
        1_716_883_201_500
    );
    assert_eq!(l[1].error_class.as_deref(), Some("retries-exhausted"));
    assert_eq!(l[1].attempts, Some(4));
    assert_eq!(l[1].workspace_id.as_deref(), Some("org_list"));
    assert_eq!(l[2].error_class.as_deref(), Some("delivery-limit"));
    assert_eq!(l[2].workspace_id.as_deref(), Some("org_other"));
    assert_eq!(l[2].first_failed_at.unwrap().timestamp(), 1_716_883_203);
    assert_eq!(l[3].kind.as_deref(), Some("user.deleted"));
    assert_eq!(l[3].workspace_id, None, "user events name no workspace");
    assert_eq!(l[3].error_class, None, "a hand-placed message has no class");
    assert_eq!(again.data, listing.data, "listing twice shows the same");
    let left = drain_queue(&settings.broker.dead_letter_queue).await;
    assert_eq!(
        message_ids(&left),
        ids,
        "the queue still holds them, in order"
    );
    for (m, original) in left.iter().zip(&msgs) {
        assert_eq!(m.delivery.data, original.body, "bodies unchanged");
    }
}

/// RabbitMQ 4.x gives a quorum queue without a delivery limit a default of 20 and then
/// drops the message (the dead-letter queue has no dead-letter exchange): the limit is
/// explicit, and the broker holds exactly that value. A re-declaration with other
/// arguments is refused (406 PRECONDITION_FAILED), so an equal one reads it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_queue_carries_an_explicit_delivery_limit() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let dead = settings.broker.dead_letter_queue.as_str();
    let declare = |limit: Option<i32>| async move {
        let (conn, ch) = broker_channel().await;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if let Some(ms) = settings.broker.queue_expires_ms {
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms as i64));
        }
        if let Some(limit) = limit {
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
        }
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let result = ch.queue_declare(dead.into(), opts, args).await;
        let _ = conn.close(200, "bye".into()).await;
        result.map(|_| ()).map_err(|e| e.to_string())
    };

    assert_eq!(
        declare(Some(provisioner::broker::DEAD_LETTER_DELIVERY_LIMIT)).await,
        Ok(()),
        "the queue holds exactly this limit"
    );
    assert_eq!(provisioner::broker::DEAD_LETTER_DELIVERY_LIMIT, i32::MAX);
    for other in [None, Some(20)] {
        let err = declare(other).await.unwrap_err();
        assert!(
            err.contains("PRECONDITION_FAILED") && err.contains("x-delivery-limit"),
            "{other:?}: {err}"
        );
    }
}

/// Listing and showing change no letter: after 50 listings and a few shows every dead
/// letter is there once, in order, with its body, properties and headers as injected —
/// but for the broker's own delivery count, one per session that read it (harmless
/// under the queue's limit of 2^31 - 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_lists_and_some_shows_leave_every_dead_letter_as_it_was() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_fifty");
    inject_dead(&settings, &msgs).await;

    for _ in 0..50 {
        let listing = dlq::list(&settings).await.unwrap();
        assert_eq!(listing.count, 4);
    }
    for id in &ids[..3] {
        dlq::show(&settings, id).await.unwrap();
    }
    let listing = dlq::list(&settings).await.unwrap();

    assert_eq!(
        listing
            .data
            .iter()
            .map(|l| l.id.clone().unwrap())
            .collect::<Vec<_>>(),
        ids
    );
    let left = drain_queue(&settings.broker.dead_letter_queue).await;
    assert_eq!(message_ids(&left), ids, "every dead letter, in order");
    for (m, original) in left.iter().zip(&msgs) {
        let p = &m.delivery.properties;
        assert_eq!(m.delivery.data, original.body, "body unchanged");
        // Each of the 54 sessions (50 lists, 3 shows, 1 list) read every letter and
        // gave it back once: the broker counted exactly that, nothing else.
        let count = header(m, "x-delivery-count").and_then(provisioner::broker::headers::int_value);
        assert_eq!(count, Some(54), "one delivery counted per session");
        let without_count = |t: &FieldTable| {
            let mut out = FieldTable::default();
            for (k, v) in t.inner() {
                if k.as_str() != "x-delivery-count" {
                    out.insert(k.clone(), v.clone());
                }
            }
            out
        };
        let shown = p.headers().as_ref().map(without_count).unwrap_or_default();
        let injected = original
            .headers
            .as_ref()
            .map(without_count)
            .unwrap_or_default();
        assert_eq!(shown, injected, "headers unchanged");
        assert_eq!(
            p.kind().as_ref().map(|k| k.as_str()),
            original.kind.as_deref()
        );
        assert_eq!(p.timestamp(), &original.timestamp);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
    }
}

/// `dlq list` of a long queue keeps the queue's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keeps_the_order_of_a_long_queue() {
    // More than 32 messages: RabbitMQ returns some batches in hash or reverse order,
    // which a naive get-then-requeue listing would expose.
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let expected = inject_numbered(&settings, 80).await;

    for _ in 0..3 {
        let listing = dlq::list(&settings).await.unwrap();
        let listed: Vec<String> = listing.data.iter().map(|l| l.id.clone().unwrap()).collect();
        assert_eq!(listed, expected);
    }

    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        expected
    );
}

/// Concurrent `dlq list`s each see every dead letter, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lists_each_see_everything_and_keep_the_order() {
    // Two consumers would split the queue and hand their shares back one after the
    // other; the session lock makes concurrent commands take turns.
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let expected = inject_numbered(&settings, 60).await;

    let (a, b, c) = tokio::join!(
        dlq::list(&settings),
        dlq::list(&settings),
        dlq::list(&settings)
    );

    for listing in [a.unwrap(), b.unwrap(), c.unwrap()] {
        let listed: Vec<String> = listing.data.iter().map(|l| l.id.clone().unwrap()).collect();
        assert_eq!(listed, expected);
    }
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        expected
    );
}

/// A dead letter made by RabbitMQ's own delivery limit lists with the reason
/// `delivery_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_delivery_limit_dead_letter_lists_as_delivery_limit() {
    // Arrange: RabbitMQ itself dead-letters after the work queue's delivery limit.
    let opts = TestOptions {
        extra_config: "[broker]\ndelivery_limit = 1\n".into(),
        ..TestOptions::default()
    };
    let (_iso, settings) = ops::broker_only(&opts).await;
    let svix = id();
    inject(
        &settings.broker.exchange,
        "organization.created",
        &[Inject::event("organization.created", "org_limit", &svix)],
    )
    .await;
    let (conn, ch) = broker_channel().await;
    let dead = eventually(Duration::from_secs(20), || async {
        if let Some(m) = ch
            .basic_get(
                settings.broker.queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
        {
            m.delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await
                .unwrap();
        }
        (queue_depth(&settings.broker.dead_letter_queue).await > 0).then_some(())
    })
    .await;
    let _ = conn.close(200, "bye".into()).await;
    assert!(dead.is_some(), "the broker dead-lettered the message");

    // Act
    let listing = dlq::list(&settings).await.unwrap();

    // Assert
    assert_eq!(listing.count, 1);
    let l = &listing.data[0];
    assert_eq!(l.id.as_deref(), Some(svix.as_str()));
    assert_eq!(l.error_class.as_deref(), Some("delivery-limit"));
    assert_eq!(l.workspace_id.as_deref(), Some("org_limit"));
    assert!(
        l.first_failed_at.is_some(),
        "x-death time is the first failure"
    );
}

/// Dead letters that arrive while a session reads the queue stay behind the ones already
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_arriving_during_a_session_stay_behind_the_others() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let first: Vec<Inject> = (0..5)
        .map(|i| Inject::event("organization.created", "org_a", &format!("msg_a{i}")))
        .collect();
    inject_dead(&settings, &first).await;

    // Act: a session reads the queue while new dead letters arrive.
    let mut session = DeadQueue::open(&settings, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(session.total(), 5);
    let mut read = Vec::new();
    while let Some(taken) = session.next().await.unwrap() {
        read.push(taken.letter.id.unwrap());
    }
    assert_eq!(read, ["msg_a0", "msg_a1", "msg_a2", "msg_a3", "msg_a4"]);
    let later: Vec<Inject> = (0..3)
        .map(|i| Inject::event("organization.created", "org_b", &format!("msg_b{i}")))
        .collect();
    inject_dead(&settings, &later).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let closed = session.close().await.unwrap();

    // Assert
    assert_eq!(closed.arrived, 3, "the arrivals are counted");
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        [
            "msg_a0", "msg_a1", "msg_a2", "msg_a3", "msg_a4", "msg_b0", "msg_b1", "msg_b2"
        ]
    );
}

/// A session holding the queue makes other sessions wait, and one that is abandoned loses
/// no dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_queue_makes_others_wait_and_an_abandoned_session_loses_nothing() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_lock");
    inject_dead(&settings, &msgs).await;

    // A session holds the queue (and two letters): another one gives up after its
    // wait, changing nothing.
    let mut holder = DeadQueue::open(&settings, Duration::from_secs(10))
        .await
        .unwrap();
    holder.next().await.unwrap().expect("a letter");
    holder.next().await.unwrap().expect("a letter");
    let err = DeadQueue::open(&settings, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, DlqError::Busy { .. }), "{err}");

    // The holder dies without closing (as a crashed process would): the broker
    // gives everything back, in order, and frees the lock.
    drop(holder);
    let listing = eventually(Duration::from_secs(20), || async {
        let l = dlq::list(&settings).await.ok()?;
        (l.count == 4).then_some(l)
    })
    .await
    .expect("the queue is whole again");
    assert_eq!(
        listing
            .data
            .iter()
            .map(|l| l.id.clone().unwrap())
            .collect::<Vec<_>>(),
        ids
    );
}

/// `dlq show` returns the whole message (body, properties, headers); an unknown id is not
/// found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_returns_the_whole_message_and_unknown_ids_are_not_found() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_show");
    inject_dead(&settings, &msgs).await;

    let shown = dlq::show(&settings, &ids[0]).await.unwrap();
    assert_eq!(shown.properties["message_id"], ids[0].as_str());
    assert_eq!(shown.properties["type"], "organizationMembership.created");
    assert_eq!(shown.properties["delivery_mode"], 2);
    assert_eq!(shown.headers["x-error-class"], "payload");
    assert_eq!(shown.headers["x-attempts"], 1);
    assert_eq!(shown.body["data"]["organization"]["id"], "org_show");
    assert_eq!(shown.copies, 1);
    let death = dlq::show(&settings, &ids[2]).await.unwrap();
    assert_eq!(death.headers["x-death"][0]["reason"], "delivery_limit");

    let err = dlq::show(&settings, "msg_nope").await.unwrap_err();
    assert!(matches!(err, DlqError::NotFound { .. }), "{err}");
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        ids
    );
}

/// Replay by id republishes that message to the events exchange and removes only its dead
/// copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_id_republishes_to_the_exchange_and_removes_only_that_copy() {
    // Arrange: the replayed one is hand-made (body + message_id + type, no headers).
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_replay");
    inject_dead(&settings, &msgs).await;

    // Act
    let report = replay(&settings, Selection::Ids(vec![ids[3].clone()])).await;

    // Assert
    assert_eq!(report.summary(), "replayed 1, failed 0");
    let work = drain_queue(&settings.broker.queue).await;
    assert_eq!(work.len(), 1);
    let m = &work[0];
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        ids[3]
    );
    assert_eq!(
        m.delivery.properties.kind().as_ref().unwrap().as_str(),
        "user.deleted"
    );
    assert_eq!(m.delivery.routing_key.as_str(), "user.deleted");
    assert_eq!(m.delivery.exchange.as_str(), settings.broker.exchange);
    assert_eq!(m.delivery.data, msgs[3].body, "same body");
    assert_eq!(m.delivery.properties.delivery_mode(), &Some(2));
    assert_eq!(header(m, "x-replayed"), Some(&AMQPValue::Boolean(true)));
    assert_eq!(
        m.delivery.properties.timestamp(),
        &Some(1_716_883_200),
        "intake time kept"
    );
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        &ids[..3],
        "the others stay, in order"
    );
}

/// A dry-run replay lists what it would replay and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_the_selection_and_changes_nothing() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_dry");
    inject_dead(&settings, &msgs).await;

    let mut opts = ReplayOptions::new(Selection::All);
    opts.dry_run = true;
    let report = dlq::replay(&settings, &opts, &Silent).await.unwrap();

    assert_eq!(report.selected.len(), 4);
    assert!(report.replayed.is_empty());
    assert_eq!(
        queue_depth(&settings.broker.queue).await,
        0,
        "nothing published"
    );
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        ids
    );
}

/// Replay by type and by organization selects exactly the matching dead letters; a
/// selection of none is no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_type_and_by_org_selects_exactly_those() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_sel");
    inject_dead(&settings, &msgs).await;

    // By type: only the organization.updated one.
    let report = replay(&settings, Selection::Type("organization.updated".into())).await;
    assert_eq!(report.replayed.len(), 1);
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.queue).await),
        [ids[1].clone()]
    );

    // By org: the membership of org_sel (the org.updated one is already gone);
    // org_other and the user event stay.
    let report = replay(&settings, Selection::Org("org_sel".into())).await;
    assert_eq!(report.replayed.len(), 1);
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.queue).await),
        [ids[0].clone()]
    );

    // A selection matching nothing is not an error and changes nothing.
    let report = replay(&settings, Selection::Org("org_none".into())).await;
    assert_eq!(report.summary(), "replayed 0, failed 0");
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        [ids[2].clone(), ids[3].clone()]
    );
}

/// Replaying an unknown id changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_an_unknown_id_changes_nothing() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_unknown");
    inject_dead(&settings, &msgs).await;

    let err = dlq::replay(
        &settings,
        &ReplayOptions::new(Selection::Ids(vec![ids[0].clone(), "msg_missing".into()])),
        &Silent,
    )
    .await
    .unwrap_err();

    assert!(
        matches!(&err, DlqError::NotFound { ids } if ids == &["msg_missing"]),
        "{err}"
    );
    assert_eq!(queue_depth(&settings.broker.queue).await, 0);
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        ids
    );
}

/// A replay the exchange cannot route keeps the dead copy: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_replay_keeps_the_dead_copy() {
    // Arrange: replay into an exchange nothing is bound to.
    let (_iso, mut settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_unroutable");
    inject_dead(&settings, &msgs).await;
    let (conn, ch) = broker_channel().await;
    let lonely = format!("{}.unbound", settings.broker.exchange);
    ch.exchange_declare(
        lonely.as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    settings.broker.exchange = lonely;

    // Act
    let report = replay(&settings, Selection::Ids(vec![ids[1].clone()])).await;
    let _ = conn.close(200, "bye".into()).await;

    // Assert
    assert_eq!(report.summary(), "replayed 0, failed 1");
    assert!(
        report.failed[0].reason.contains("unroutable"),
        "{}",
        report.failed[0].reason
    );
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        ids
    );
}

/// A replay to a missing exchange fails and loses no dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_fails_the_replay_and_loses_nothing() {
    let (_iso, mut settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_noexchange");
    inject_dead(&settings, &msgs).await;
    settings.broker.exchange = format!("{}.does-not-exist", settings.broker.exchange);

    let report = replay(&settings, Selection::All).await;

    assert_eq!(report.replayed.len(), 0);
    assert_eq!(report.failed.len(), 4, "{:?}", report.failed);
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        ids
    );
}

/// `dlq purge` removes only the dead letters it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_only_what_it_names() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_purge");
    inject_dead(&settings, &msgs).await;

    let report = dlq::purge(
        &settings,
        &Selection::Ids(vec![ids[1].clone(), ids[2].clone()]),
    )
    .await
    .unwrap();
    assert_eq!(report.count, 2);
    let err = dlq::purge(&settings, &Selection::Ids(vec![ids[1].clone()]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DlqError::NotFound { .. }),
        "an id already purged is not found"
    );

    assert_eq!(
        queue_depth(&settings.broker.queue).await,
        0,
        "purge never publishes"
    );
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        [ids[0].clone(), ids[3].clone()]
    );
}

/// Two concurrent replays lose nothing and replay each dead letter exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_replays_lose_nothing_and_replay_each_once() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let msgs: Vec<Inject> = (0..20)
        .map(|i| {
            Inject::event(
                "organization.created",
                &format!("org_c{i}"),
                &format!("msg_c{i:02}"),
            )
        })
        .collect();
    inject_dead(&settings, &msgs).await;

    let opts = ReplayOptions::new(Selection::All);
    let (a, b) = tokio::join!(
        dlq::replay(&settings, &opts, &Silent),
        dlq::replay(&settings, &opts, &Silent)
    );
    let (a, b) = (a.unwrap(), b.unwrap());

    assert!(a.failed.is_empty() && b.failed.is_empty());
    assert_eq!(
        a.replayed.len() + b.replayed.len(),
        20,
        "each taken by one replayer"
    );
    let work = message_ids(&drain_queue(&settings.broker.queue).await);
    for i in 0..20 {
        let id = format!("msg_c{i:02}");
        assert!(work.contains(&id), "{id} reached the work queue");
    }
    assert_eq!(queue_depth(&settings.broker.dead_letter_queue).await, 0);
}

/// A missing dead-letter queue is a clear error, not an empty list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_queue_is_a_clear_error() {
    let iso = Isolation::new();
    let settings = test_settings(&iso, &TestOptions::default());
    let err = dlq::list(&settings).await.unwrap_err();
    assert!(matches!(err, DlqError::QueueMissing { .. }), "{err}");
    assert!(err.to_string().contains(&settings.broker.dead_letter_queue));
}

/// A page reads the queue only down to its own rows: the letters after it are not
/// even delivered (no delivery counted), and the queue's count comes from the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_reads_the_queue_only_down_to_itself() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let msgs = many_letters("msg_page", 60, 0);
    inject_dead_routed(&settings, &msgs).await;

    let page = dlq::page(&settings, None, dlq::PageRequest { page: 2, limit: 20 })
        .await
        .unwrap();

    assert_eq!(
        (page.in_queue, page.matching, page.page, page.pages),
        (60, 60, 2, 3)
    );
    let rows: Vec<String> = page.rows.iter().map(|l| l.id.clone().unwrap()).collect();
    let expected: Vec<String> = (20..40).map(|i| format!("msg_page_{i:03}")).collect();
    assert_eq!(rows, expected);
    let left = drain_queue(&settings.broker.dead_letter_queue).await;
    assert_intact(&left, &msgs, &settings.broker.dead_letter_exchange);
    assert_eq!(
        message_ids(&left)[..3],
        ["msg_page_000", "msg_page_001", "msg_page_002"]
    );
    let count = |m: &lapin::message::BasicGetMessage| {
        header(m, "x-delivery-count").and_then(provisioner::broker::headers::int_value)
    };
    for (i, m) in left.iter().enumerate() {
        // RabbitMQ 3.10 writes the count on every delivery, 0 on the first: the
        // drain's own delivery shows 1 for a letter the page read, 0 for the rest.
        let expected = if i < 40 { Some(1) } else { Some(0) };
        assert_eq!(
            count(m),
            expected,
            "letter {i}: read only when the page needed it"
        );
    }
}

/// Pages keep the queue's order after earlier views: RabbitMQ 3.10 puts a letter
/// given back behind the letters given back before it, so a page reads on past its
/// rows through those, to the first letter never delivered, and stops soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_keep_the_order_of_a_queue_viewed_before() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let msgs = many_letters("msg_again", 100, 0);
    inject_dead(&settings, &msgs[..60]).await;
    dlq::list(&settings).await.unwrap();
    inject_dead(&settings, &msgs[60..]).await;
    let all: Vec<String> = msgs.iter().map(|m| m.message_id.clone().unwrap()).collect();

    let want = |page| dlq::PageRequest { page, limit: 10 };
    let first = dlq::page(&settings, None, want(1)).await.unwrap();
    let second = dlq::page(&settings, None, want(2)).await.unwrap();

    let ids = |p: &dlq::Page| {
        p.rows
            .iter()
            .map(|l| l.id.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&first), all[..10]);
    assert_eq!(ids(&second), all[10..20], "page 2 follows page 1");
    let left = drain_queue(&settings.broker.dead_letter_queue).await;
    assert_eq!(message_ids(&left), all, "the queue in its order");
    let count = |m: &lapin::message::BasicGetMessage| {
        header(m, "x-delivery-count").and_then(provisioner::broker::headers::int_value)
    };
    // The list and both pages read the first 60. A page stops at the first letter
    // never delivered, with at most the rest of its window (15) sent after it: page
    // 1 at index 60 (so read at most to 75), page 2 at index 76 at the latest (so
    // read at most to 91).
    assert!(left[..60].iter().all(|m| count(m) == Some(3)));
    assert_eq!(
        count(&left[60]),
        Some(2),
        "both pages read the first fresh letter"
    );
    assert!(left[92..].iter().all(|m| count(m) == Some(0)), "never sent");
}

/// A filtered page looks at every letter but keeps only its rows and a count; a
/// page past the end (however far) shows the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_page_counts_every_match_and_keeps_its_rows() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let msgs = many_letters("msg_filter", 50, 0);
    inject_dead(&settings, &msgs).await;
    let users = |l: &dlq::DeadLetter| l.kind.as_deref() == Some("user.deleted");

    let second = dlq::page(
        &settings,
        Some(&users),
        dlq::PageRequest { page: 2, limit: 10 },
    )
    .await
    .unwrap();
    let past = dlq::page(
        &settings,
        Some(&users),
        dlq::PageRequest { page: 9, limit: 10 },
    )
    .await
    .unwrap();
    let far = dlq::PageRequest {
        page: usize::MAX,
        limit: 500,
    };
    let farthest = dlq::page(&settings, Some(&users), far).await.unwrap();

    let ids = |p: &dlq::Page| {
        p.rows
            .iter()
            .map(|l| l.id.clone().unwrap())
            .collect::<Vec<_>>()
    };
    let users_at: Vec<String> = (0..50)
        .filter(|i| i % 3 == 2)
        .map(|i| format!("msg_filter_{i:03}"))
        .collect();
    assert_eq!(
        (second.in_queue, second.matching, second.pages),
        (50, 16, 2)
    );
    assert_eq!(ids(&second), users_at[10..]);
    assert_eq!(past.page, 2, "a page past the end shows the last");
    assert_eq!(ids(&past), users_at[10..]);
    assert_eq!((farthest.page, ids(&farthest)), (1, users_at.clone()));
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        msgs.iter()
            .map(|m| m.message_id.clone().unwrap())
            .collect::<Vec<_>>(),
        "the queue as it was, in order"
    );
}

/// Purging letters spread through a long queue removes exactly those, once the
/// others are back, and keeps the others in their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_letters_spread_through_the_queue_removes_exactly_those() {
    let (_iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let msgs = many_letters("msg_spread", 90, 0);
    inject_dead(&settings, &msgs).await;
    let all: Vec<String> = msgs.iter().map(|m| m.message_id.clone().unwrap()).collect();
    let pick = |every: fn(usize) -> bool| -> Vec<String> {
        (0..all.len())
            .filter(|i| every(*i))
            .map(|i| all[i].clone())
            .collect()
    };
    let gone = pick(|i| i % 3 == 1);
    let kept = pick(|i| i % 3 != 1);

    let report = dlq::purge(&settings, &Selection::Ids(gone.clone()))
        .await
        .unwrap();

    assert_eq!(report.count, 30);
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        kept
    );
}

/// A `dlq list` killed (SIGKILL) while it reads leaves the queue exactly as it was:
/// the same letters, each once, with their headers, exchange and routing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dlq_list_leaves_the_queue_as_it_was() {
    let (iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let msgs = many_letters("msg_kill", 150, 100_000);
    inject_dead_routed(&settings, &msgs).await;
    let cfg = config_file(&iso, "");
    let env: Vec<(String, String)> = vec![
        ("PROVISIONER_CONFIG".into(), cfg.display().to_string()),
        ("AMQP_URL".into(), base_amqp_url()),
        ("PROVISIONER_ENV".into(), "development".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];

    // Killed at several points of its read (and, before this release, of its
    // putting copies back).
    for delay_ms in [150, 400, 700, 1000, 1400, 2000] {
        let mut list = Process::start("dlq list", &["dlq", "list"], &env);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        list.sigkill();
    }

    // The broker returns a dead connection's messages by itself.
    let dead = settings.broker.dead_letter_queue.as_str();
    let whole = eventually(Duration::from_secs(30), || async {
        (queue_depth(dead).await >= 150).then_some(())
    })
    .await;
    assert!(
        whole.is_some(),
        "the letters came back: {}",
        queue_depth(dead).await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = drain_queue(dead).await;
    assert_intact(&left, &msgs, &settings.broker.dead_letter_exchange);
    let _ = std::fs::remove_file(cfg);
}

// ---- the binary -------------------------------------------------------------------

/// A dead letter that stands twice (what a dlq command killed between putting a copy
/// back and acknowledging the original leaves) is not doubled silently: the table
/// lists both and a note names the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_list_names_an_id_that_stands_twice() {
    let (iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_twice");
    let mut with_copy = msgs.clone();
    with_copy.push(msgs[1].clone());
    inject_dead(&settings, &with_copy).await;
    let cfg = config_file(&iso, "");

    let out = run_binary(&cfg, &[], &["dlq", "list"]).await;

    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("5 dead letter(s)"), "{text}");
    assert!(
        text.contains(&format!("1 id(s) appear more than once: {}", ids[1])),
        "{text}"
    );
    let _ = std::fs::remove_file(cfg);
}

/// The `provisioner dlq` binary lists as JSON, replays, and refuses to purge without
/// `--yes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_lists_as_json_replays_and_refuses_purge_without_yes() {
    let (iso, settings) = ops::broker_only(&TestOptions::default()).await;
    let (msgs, ids) = mixed("org_bin");
    inject_dead(&settings, &msgs).await;
    let cfg = config_file(&iso, "");

    // list --json: one JSON document with every dead letter.
    let out = run_binary(&cfg, &[], &["dlq", "list", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["count"], 4);
    assert_eq!(doc["data"][0]["id"], ids[0].as_str());
    assert_eq!(doc["data"][0]["error_class"], "payload");
    assert_eq!(doc["data"][2]["error_class"], "delivery-limit");

    // show --json
    let out = run_binary(&cfg, &[], &["dlq", "show", &ids[1], "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["body"]["type"], "organization.updated");

    // show of an unknown id: non-zero, one line.
    let out = run_binary(&cfg, &[], &["dlq", "show", "msg_unknown"]).await;
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains("no dead letter with id msg_unknown"),
        "{}",
        stderr(&out)
    );

    // purge without --yes refuses and removes nothing.
    let out = run_binary(&cfg, &[], &["dlq", "purge", "--all"]).await;
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.starts_with("error: ") && line.contains("--yes"),
        "{line}"
    );
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line");
    assert_eq!(queue_depth(&settings.broker.dead_letter_queue).await, 4);

    // replay --dry-run, then replay --id.
    let out = run_binary(&cfg, &[], &["dlq", "replay", "--all", "--dry-run"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("would replay 4"), "{}", stdout(&out));
    let out = run_binary(
        &cfg,
        &[],
        &["dlq", "replay", "--rate", "20", "--id", &ids[0], &ids[1]],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("replayed 2, failed 0"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.queue).await),
        &ids[..2]
    );

    // purge --id … --yes removes only that one and says so.
    let out = run_binary(&cfg, &[], &["dlq", "purge", "--id", &ids[3], "--yes"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("removed {}", ids[3])));
    assert_eq!(
        message_ids(&drain_queue(&settings.broker.dead_letter_queue).await),
        [ids[2].clone()]
    );
    let _ = std::fs::remove_file(cfg);
}

/// `provisioner dlq` against an unreachable broker names it in its error, without the
/// password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_names_an_unreachable_broker_without_its_password() {
    let iso = Isolation::new();
    let cfg = config_file(&iso, "");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("amqp://ops:s3cr3t-pw@127.0.0.1:{port}/%2f");

    for args in [
        &["dlq", "list"][..],
        &["dlq", "replay", "--all"][..],
        &["dlq", "purge", "--all", "--yes"][..],
    ] {
        let out = run_binary(&cfg, &[("AMQP_URL", url.clone())], args).await;
        let redacted = format!("amqp://ops:***@127.0.0.1:{port}/%2f");
        assert_failed_naming(&out, &redacted, "s3cr3t-pw", &format!("{args:?}"));
    }
    let _ = std::fs::remove_file(cfg);
}

/// lapin reads no password from the query, but one written there (`?password=`) is
/// hidden all the same, in the error and the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_names_an_unreachable_broker_without_its_query_parameter_password() {
    let iso = Isolation::new();
    let cfg = config_file(&iso, "");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("amqp://ops@127.0.0.1:{port}/%2f?password=s3cr3t-qu3ry");

    let out = run_binary(
        &cfg,
        &[("AMQP_URL", url), ("RUST_LOG", "debug".into())],
        &["dlq", "list"],
    )
    .await;

    let redacted = format!("amqp://ops@127.0.0.1:{port}/%2f?password=***");
    assert_failed_naming(&out, &redacted, "s3cr3t-qu3ry", "dlq list");
    let _ = std::fs::remove_file(cfg);
}

/// A peer that accepts the connection but never speaks AMQP (a stalled broker, or a
/// port taken by something else) fails the command within the connect deadline,
/// naming the URL without its password, instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_gives_up_on_a_broker_that_never_answers() {
    let iso = Isolation::new();
    let cfg = config_file(&iso, "");
    // Accepted by the kernel's backlog, never read from or answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("amqp://ops:s3cr3t-pw@127.0.0.1:{port}/%2f");

    let started = std::time::Instant::now();
    let out = run_binary(&cfg, &[("AMQP_URL", url.clone())], &["dlq", "list"]).await;
    let took = started.elapsed();
    let redacted = format!("amqp://ops:***@127.0.0.1:{port}/%2f");
    assert_failed_naming(&out, &redacted, "s3cr3t-pw", "dlq list");
    assert!(
        took >= Duration::from_secs(5),
        "it waited for the peer before giving up: {took:?}"
    );
    drop(silent);
    let _ = std::fs::remove_file(cfg);
}

/// `provisioner dlq` prints its help and refuses bad arguments with a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_help_and_argument_errors() {
    let iso = Isolation::new();
    let cfg = config_file(&iso, "");
    for args in [
        &["dlq", "--help"][..],
        &["dlq", "list", "--help"][..],
        &["dlq", "show", "--help"][..],
        &["dlq", "replay", "--help"][..],
        &["dlq", "purge", "--help"][..],
    ] {
        let out = run_binary(&cfg, &[], args).await;
        assert!(out.status.success(), "{args:?}");
        assert!(stdout(&out).contains("Usage"), "{args:?}");
    }
    // replay needs exactly one selection.
    let out = run_binary(&cfg, &[], &["dlq", "replay"]).await;
    assert!(!out.status.success());
    let out = run_binary(&cfg, &[], &["dlq", "replay", "--all", "--type", "x"]).await;
    assert!(!out.status.success());
    let out = run_binary(&cfg, &[], &["dlq", "replay", "--all", "--rate", "0"]).await;
    assert!(!out.status.success());
    let _ = std::fs::remove_file(cfg);
}
