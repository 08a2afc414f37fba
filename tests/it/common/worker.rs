//! Helpers for the worker's tests: publishing raw messages, reading dead letters'
//! headers, waiting on the processing log, and configuration for child processes.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use provisioner::broker;
use sqlx::PgPool;

use super::{Isolation, broker_channel, eventually};

/// How long the harness waits for a confirm before failing the test.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// An application with the worker running in its process.
pub fn worker_opts() -> super::TestOptions {
    super::TestOptions {
        worker: true,
        ..super::TestOptions::default()
    }
}

/// An `organization.created` webhook body for workspace `id` named `name`
/// (slug from the name), sent now.
pub fn org_created(id: &str, name: &str) -> Vec<u8> {
    let mut data = super::fixture("organization.created")["data"].clone();
    data["id"] = serde_json::json!(id);
    data["name"] = serde_json::json!(name);
    data["slug"] = serde_json::json!(name.to_lowercase().replace(' ', "-"));
    super::envelope("organization.created", data, super::now_secs() * 1000)
}

/// A pool on the test's database through the real server (never a proxy).
pub async fn direct_pool(iso: &Isolation) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&iso.database_url())
        .await
        .expect("test database reachable")
}

/// Publishes one persistent message with confirm and asserts it was routed.
pub async fn publish_raw(exchange: &str, routing_key: &str, body: &[u8], props: BasicProperties) {
    publish_each(exchange, [(routing_key, body, props)]).await;
}

/// Publishes messages in order on one connection, each persistent and confirmed;
/// asserts each was routed.
pub async fn publish_each<'a>(
    exchange: &str,
    messages: impl IntoIterator<Item = (&'a str, &'a [u8], BasicProperties)>,
) {
    let (conn, _) = broker_channel().await;
    let ch = broker::confirm_channel(&conn).await.unwrap();
    for (routing_key, body, props) in messages {
        let props = props.with_delivery_mode(2);
        let result =
            broker::publish_confirmed(&ch, exchange, routing_key, body, props, PUBLISH_TIMEOUT)
                .await;
        assert!(result.is_ok(), "message routed and confirmed: {result:?}");
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Properties of a message as intake publishes it.
pub fn event_props(svix_id: &str, kind: &str) -> BasicProperties {
    broker::event_properties(svix_id, kind).with_timestamp(super::now_secs() as u64)
}

/// Adds headers to properties.
pub fn with_headers(props: BasicProperties, entries: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in entries {
        table.insert((*k).into(), v.clone());
    }
    props.with_headers(table)
}

/// A text header of a message.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header of a message, read like the worker reads it.
pub fn header_int(props: &BasicProperties, key: &str) -> Option<i64> {
    provisioner::broker::headers::int(props.headers().as_ref()?, key)
}

/// Status of a svix id in the processing log.
pub async fn event_status(db: &PgPool, svix_id: &str) -> Option<String> {
    sqlx::query_scalar("select status from events where svix_id = $1")
        .bind(svix_id)
        .fetch_optional(db)
        .await
        .ok()
        .flatten()
}

/// Waits (generously: the machine may be loaded) until the svix id has this status;
/// false if it never did.
pub async fn wait_status(db: &PgPool, svix_id: &str, status: &str) -> bool {
    eventually(Duration::from_secs(60), || async {
        (event_status(db, svix_id).await.as_deref() == Some(status)).then_some(())
    })
    .await
    .is_some()
}

/// Waits until a queue holds at least `n` ready messages.
pub async fn wait_depth(queue: &str, n: u32) -> bool {
    eventually(Duration::from_secs(60), || async {
        (super::queue_depth(queue).await >= n).then_some(())
    })
    .await
    .is_some()
}

/// A count from SQL.
pub async fn count(db: &PgPool, sql: &'static str, bind: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(db)
        .await
        .unwrap()
}

/// Waits until `queue` holds a message, then takes everything in it: exactly one
/// message, or the test fails.
pub async fn the_one_message(queue: &str) -> lapin::message::BasicGetMessage {
    assert!(wait_depth(queue, 1).await, "{queue} holds a message");
    let mut all = super::drain_queue(queue).await;
    assert_eq!(all.len(), 1, "{queue} holds exactly one message");
    all.pop().unwrap()
}

/// Makes writes of workspace `org` fail with `message`, a plain (non-connectivity)
/// error: the first `times` writes (a sequence counts them: it is not rolled back
/// with the transaction), or with `None` every write until [`heal_workspace_writes`]
/// (a cause outside the event, like a broken constraint or a bad migration).
pub async fn fail_workspace_writes(db: &PgPool, org: &str, times: Option<i64>, message: &str) {
    sqlx::query("create sequence injected_failures")
        .execute(db)
        .await
        .unwrap();
    let fails = match times {
        Some(n) => format!("nextval('injected_failures') <= {n}"),
        None => "true".to_owned(),
    };
    let sql = format!(
        "create function fail_workspace_write() returns trigger language plpgsql as $$
         begin
           if new.id = '{org}' and {fails} then raise exception '{message}'; end if;
           return new;
         end $$"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(db)
        .await
        .unwrap();
    sqlx::query(
        "create trigger fail_workspace_write before insert or update on workspaces
         for each row execute function fail_workspace_write()",
    )
    .execute(db)
    .await
    .unwrap();
}

/// Ends [`fail_workspace_writes`]: workspace writes succeed again.
pub async fn heal_workspace_writes(db: &PgPool) {
    sqlx::query("drop trigger fail_workspace_write on workspaces")
        .execute(db)
        .await
        .unwrap();
}

/// A confirmed publisher on the machine's broker with the test's topology.
pub async fn test_publisher(
    settings: &provisioner::config::Settings,
) -> provisioner::broker::Publisher {
    let url = provisioner::config::ConnectionUrl::new(super::base_amqp_url());
    let publisher = provisioner::broker::Publisher::start(
        url,
        provisioner::broker::Topology::new(&settings.broker, &settings.worker),
        "test-publisher",
        Duration::from_secs(5),
        tokio_util::sync::CancellationToken::new(),
    );
    assert!(publisher.wait_connected(Duration::from_secs(60)).await);
    publisher
}

/// Logs to the test output when `TEST_LOG` is set (e.g. `TEST_LOG=provisioner=debug`).
pub fn trace() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}
