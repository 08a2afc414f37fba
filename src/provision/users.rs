//! Users: `user.updated` refreshes a user's display fields on their membership
//! rows, `user.deleted` tombstones the user and ends their memberships (DESIGN §5).
//!
//! Guarantee: run under the user's advisory lock inside the caller's transaction;
//! the user row keeps the standing snapshot and the earliest deletion, whatever the
//! order the events arrive in.

use serde_json::json;
use sqlx::PgConnection;

use super::apply::{Begin, Ctx, Source, ts};
use super::members::{Display, Ending, end_memberships};
use super::payload::User;

/// `user.updated`: keep the standing user snapshot and refresh the display fields
/// of every membership of the user, removed ones included, whose fields come from a
/// source it beats (removed rows too, so their fields do not depend on whether the
/// update arrived before or after the removal).
pub(super) async fn update_user(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    u: &User,
    st: &Begin,
) -> Result<bool, sqlx::Error> {
    let incoming = cx.incoming;
    let this = Source::new(u.updated_at, &incoming.svix_id);
    if !this.beats_stored(Source::stored(st.u_source_version, &st.u_source_event)) {
        // Every member row already carries a source at least as strong.
        return Ok(false);
    }
    sqlx::query(
        "insert into users (id, email, first_name, last_name, image_url, source_version, \
           source_event) \
         values ($1, $2, $3, $4, $5, $6, $7) \
         on conflict (id) do update set email = excluded.email, \
           first_name = excluded.first_name, last_name = excluded.last_name, \
           image_url = excluded.image_url, source_version = excluded.source_version, \
           source_event = excluded.source_event, updated_at = now()",
    )
    .bind(&u.id)
    .bind(&u.email)
    .bind(&u.first_name)
    .bind(&u.last_name)
    .bind(&u.image_url)
    .bind(u.updated_at)
    .bind(&incoming.svix_id)
    .execute(&mut *conn)
    .await?;
    #[derive(sqlx::FromRow)]
    struct Row {
        membership_id: String,
        workspace_id: String,
        active: bool,
        email: Option<String>,
        first_name: Option<String>,
        last_name: Option<String>,
        image_url: Option<String>,
        profile_version: i64,
        profile_event: Option<String>,
    }
    // The user's rows are written only under the user's lock, which this event holds.
    let rows: Vec<Row> = sqlx::query_as(
        "select membership_id, workspace_id, removed_at is null as active, email, first_name, \
           last_name, image_url, profile_version, profile_event \
         from members where user_id = $1",
    )
    .bind(&u.id)
    .fetch_all(&mut *conn)
    .await?;
    let after = Display {
        email: u.email.clone(),
        first_name: u.first_name.clone(),
        last_name: u.last_name.clone(),
        image_url: u.image_url.clone(),
    };
    let mut refreshed = Vec::new();
    for row in rows {
        let stored = Source {
            version: row.profile_version,
            event: row.profile_event.as_deref(),
        };
        if !this.beats(stored) {
            continue;
        }
        let before = Display {
            email: row.email,
            first_name: row.first_name,
            last_name: row.last_name,
            image_url: row.image_url,
        };
        if row.active && before != after {
            cx.audit(
                &row.workspace_id,
                "member.updated",
                Some(&u.id),
                json!({ "membership_id": row.membership_id, "before": before.json(), "after": after.json() }),
            );
        }
        refreshed.push(row.membership_id);
    }
    if !refreshed.is_empty() {
        sqlx::query(
            "update members set email = $2, first_name = $3, last_name = $4, image_url = $5, \
               profile_version = $6, profile_event = $7, updated_at = now() \
             where membership_id = any($1)",
        )
        .bind(&refreshed)
        .bind(&u.email)
        .bind(&u.first_name)
        .bind(&u.last_name)
        .bind(&u.image_url)
        .bind(u.updated_at)
        .bind(&incoming.svix_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(true)
}

/// `user.deleted`: tombstone the user (the earliest deletion time kept, whatever
/// the order the deletes arrive in) and end every membership of theirs.
pub(super) async fn delete_user(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    id: &str,
    at_ms: i64,
) -> Result<bool, sqlx::Error> {
    let at = ts(at_ms);
    let tombstoned: Option<i32> = sqlx::query_scalar(
        "insert into users (id, deleted_at) values ($1, $2) \
         on conflict (id) do update set deleted_at = excluded.deleted_at, updated_at = now() \
         where users.deleted_at is null or users.deleted_at > excluded.deleted_at \
         returning 1",
    )
    .bind(id)
    .bind(at)
    .fetch_optional(&mut *conn)
    .await?;
    let ended = end_memberships(conn, cx, Ending::User(id), at).await?;
    Ok(tombstoned.is_some() || ended)
}
