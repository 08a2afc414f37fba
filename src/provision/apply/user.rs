//! Users: `user.updated` refreshes a user's display fields on their membership
//! rows, `user.deleted` tombstones the user and ends their memberships (DESIGN §5).
//!
//! Guarantee: run under the user's advisory lock inside the caller's transaction;
//! the user row keeps the standing snapshot and the earliest deletion, whatever the
//! order the events arrive in.

use serde_json::json;
use sqlx::PgConnection;

use super::audit::Ctx;
use super::display::Display;
use super::membership::{Ending, end_memberships};
use super::rules::{Source, ts};
use super::state::Begin;
use crate::provision::payload::User;

/// `user.updated`: keep the snapshot (every one, in `user_profiles`, for the
/// fallback of rows that end later), keep the standing one as the user record,
/// and refresh the display fields of each membership row of the user whose fields
/// come from a source it beats: an active row, or a removed one when the snapshot
/// is not after its end (so a former workspace does not learn a departed user's
/// new details, and a removed row's fields do not depend on whether the update
/// arrived before or after the removal). `member.updated` is audited for active
/// rows only.
///
/// The user's rows are locked first: an event that ends one of them while holding
/// only its workspace's lock (a removal naming no user, an organization's
/// deletion) then either ended it before, and this update sees the end, or waits
/// and sees this snapshot when it computes the fallback.
pub(super) async fn update_user(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    u: &User,
    st: &Begin,
) -> Result<bool, sqlx::Error> {
    let incoming = cx.incoming;
    let this = Source::new(u.updated_at, &incoming.svix_id);
    sqlx::query("select 1 from members where user_id = $1 order by membership_id for update")
        .bind(&u.id)
        .execute(&mut *conn)
        .await?;
    let user_new = this.beats_stored(Source::stored(st.u_source_version, &st.u_source_event));
    #[derive(sqlx::FromRow)]
    struct Row {
        membership_id: String,
        workspace_id: String,
        active: bool,
        email: Option<String>,
        first_name: Option<String>,
        last_name: Option<String>,
        image_url: Option<String>,
    }
    // One statement: the kept snapshot, the user record when this one stands, and
    // the rows it reaches (their fields before, from the locked rows).
    let refreshed: Vec<Row> = sqlx::query_as(
        "with kept as ( \
           insert into user_profiles (user_id, version, svix_id, email, first_name, \
             last_name, image_url) \
           values ($1, $6, $7, $2, $3, $4, $5) on conflict do nothing), \
         standing as ( \
           insert into users (id, email, first_name, last_name, image_url, source_version, \
             source_event) \
           select $1, $2, $3, $4, $5, $6, $7 where $8 \
           on conflict (id) do update set email = excluded.email, \
             first_name = excluded.first_name, last_name = excluded.last_name, \
             image_url = excluded.image_url, source_version = excluded.source_version, \
             source_event = excluded.source_event, updated_at = now()) \
         update members m set email = $2, first_name = $3, last_name = $4, image_url = $5, \
           profile_version = $6, profile_event = $7, updated_at = now() \
         from members o \
         where o.membership_id = m.membership_id and m.user_id = $1 \
           and (m.removed_at is null \
                or $6 <= (extract(epoch from m.removed_at) * 1000)::int8) \
           and ($6 > m.profile_version \
                or ($6 = m.profile_version \
                    and (m.profile_event is null or $7 < m.profile_event collate \"C\"))) \
         returning m.membership_id, m.workspace_id, m.removed_at is null as active, \
           o.email, o.first_name, o.last_name, o.image_url",
    )
    .bind(&u.id)
    .bind(&u.email)
    .bind(&u.first_name)
    .bind(&u.last_name)
    .bind(&u.image_url)
    .bind(u.updated_at)
    .bind(&incoming.svix_id)
    .bind(user_new)
    .fetch_all(&mut *conn)
    .await?;
    let after = Display {
        email: u.email.clone(),
        first_name: u.first_name.clone(),
        last_name: u.last_name.clone(),
        image_url: u.image_url.clone(),
    };
    let changed = user_new || !refreshed.is_empty();
    for row in refreshed {
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
    }
    // An older snapshot that no row takes is superseded (it is kept all the same).
    Ok(changed)
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
