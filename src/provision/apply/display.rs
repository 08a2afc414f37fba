//! Display fields of a membership row (issue 19 item 13): the standing source
//! among the membership's own snapshot and the user's `user.updated` snapshots not
//! after the membership's end (all of them while it is active).
//!
//! Guarantee: the same rule in Rust (for the one row a membership event writes,
//! from the state it read) and in SQL (for statements that end or restore rows of
//! many users at once), so a row's display fields are a function of the set of
//! events applied: only active rows follow the user, and an end that arrives after
//! a newer `user.updated` makes the row fall back to the best source not after it.

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::rules::{End, Source};
use crate::provision::payload::PublicUser;

/// The standing display source of member row `m` were it to end at `$end` (ms; a
/// null end: it is active), in SQL, for the statements that end rows of many users
/// at once: among the membership's own snapshot and the user's `user.updated`
/// snapshots not after the end, the newest, on equal versions the smaller svix id
/// (as [`Source::beats`]); nothing known: null fields, version 0. A row-valued
/// subquery for `set (email, first_name, last_name, image_url, profile_version,
/// profile_event) = …`.
macro_rules! standing_display {
    ($end:literal) => {
        concat!(
            "(select c.email, c.first_name, c.last_name, c.image_url, c.v, c.e from ( \
               select m.source_version as v, m.source_event as e, m.snapshot_email as email, \
                 m.snapshot_first_name as first_name, m.snapshot_last_name as last_name, \
                 m.snapshot_image_url as image_url \
               where m.source_version <> 0 or m.source_event is not null \
               union all \
               select p.version, p.svix_id, p.email, p.first_name, p.last_name, p.image_url \
               from user_profiles p \
               where p.user_id = m.user_id and (",
            $end,
            "::int8 is null or p.version <= ",
            $end,
            ") \
               union all \
               select 0, null, null, null, null, null) c \
             order by c.v desc, c.e collate \"C\" nulls last limit 1)"
        )
    };
}
pub(super) use standing_display;

/// Display fields of a member.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Display {
    pub(super) email: Option<String>,
    pub(super) first_name: Option<String>,
    pub(super) last_name: Option<String>,
    pub(super) image_url: Option<String>,
}

impl Display {
    pub(super) fn json(&self) -> Value {
        json!({
            "email": self.email, "first_name": self.first_name,
            "last_name": self.last_name, "image_url": self.image_url,
        })
    }

    pub(super) fn of(user: &PublicUser) -> Self {
        Self {
            email: user.identifier.clone(),
            first_name: user.first_name.clone(),
            last_name: user.last_name.clone(),
            image_url: user.image_url.clone(),
        }
    }
}

/// Display fields with the source they came from: a membership snapshot or a
/// `user.updated` (version 0 and no svix id: nothing known).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Profile {
    pub(super) display: Display,
    pub(super) version: i64,
    pub(super) event: Option<String>,
}

impl Profile {
    fn source(&self) -> Source<'_> {
        Source {
            version: self.version,
            event: self.event.as_deref(),
        }
    }
}

/// The source that stands between two ([`Source::beats`]).
pub(super) fn standing(a: Option<Profile>, b: Option<Profile>) -> Option<Profile> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.source().beats(a.source()) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The user's standing `user.updated` snapshot among those not after `end` (all of
/// them when `end` is `None`): the user record (`user`, as the event's state read
/// it; `None`: no user.updated was ever applied) when it is not after the end,
/// else the best of the user's kept snapshots (`user_profiles`) that is. Called
/// under the user's lock, so the snapshots read are all there are.
pub(super) async fn user_source_until(
    conn: &mut PgConnection,
    user: Option<Profile>,
    user_id: &str,
    end: Option<End<'_>>,
) -> Result<Option<Profile>, sqlx::Error> {
    let Some(user) = user else {
        // No user.updated was ever applied.
        return Ok(None);
    };
    let Some(until) = end.map(|(at, _)| at.timestamp_millis()) else {
        return Ok(Some(user));
    };
    if user.version <= until {
        return Ok(Some(user));
    }
    #[derive(sqlx::FromRow)]
    struct Kept {
        version: i64,
        svix_id: String,
        email: Option<String>,
        first_name: Option<String>,
        last_name: Option<String>,
        image_url: Option<String>,
    }
    let kept: Option<Kept> = sqlx::query_as(
        "select version, svix_id, email, first_name, last_name, image_url \
         from user_profiles where user_id = $1 and version <= $2 \
         order by version desc, svix_id collate \"C\" limit 1",
    )
    .bind(user_id)
    .bind(until)
    .fetch_optional(conn)
    .await?;
    Ok(kept.map(|k| Profile {
        version: k.version,
        event: Some(k.svix_id),
        display: Display {
            email: k.email,
            first_name: k.first_name,
            last_name: k.last_name,
            image_url: k.image_url,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(version: i64, event: Option<&str>, email: &str) -> Profile {
        Profile {
            display: Display {
                email: Some(email.to_owned()),
                ..Display::default()
            },
            version,
            event: event.map(str::to_owned),
        }
    }

    /// The standing display source is the one that beats the other, whichever
    /// side it is given on; with one side unknown the other stands.
    #[test]
    fn the_standing_source_does_not_depend_on_the_side_it_is_given_on() {
        let older = profile(1, Some("msg_a"), "old@example.com");
        let newer = profile(2, Some("msg_b"), "new@example.com");
        let tie = profile(2, Some("msg_a"), "tie@example.com");
        for (a, b, expected) in [
            (&older, &newer, &newer),
            (&newer, &tie, &tie),
            (&tie, &older, &tie),
        ] {
            assert_eq!(
                standing(Some(a.clone()), Some(b.clone())).as_ref(),
                Some(expected)
            );
            assert_eq!(
                standing(Some(b.clone()), Some(a.clone())).as_ref(),
                Some(expected)
            );
        }
        assert_eq!(standing(None, Some(older.clone())), Some(older.clone()));
        assert_eq!(standing(Some(older.clone()), None), Some(older));
        assert_eq!(standing(None, None), None);
    }
}
