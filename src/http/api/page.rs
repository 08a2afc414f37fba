//! Keyset pages of the list routes (members, a user's workspaces): `limit` and the
//! opaque `after` cursor.
//!
//! Guarantee: a cursor names the last row of a page of one list (the key of the row
//! and the list it came from, e.g. the workspace whose members are listed), and is
//! refused (`400 invalid_cursor`) unless this API issued it for that same list: a
//! cursor edited by hand, truncated, or taken from another list fails its check.
//! Rows are ordered by their key, so paging serves every row that exists throughout
//! exactly once.

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::http::error::{ErrorCode, HttpError};

/// Rows per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// Largest `limit` accepted.
pub const MAX_LIMIT: i64 = 500;

/// Bytes of the check at the head of a cursor.
const CHECK_LEN: usize = 8;

/// Query parameters of a paged list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Rows per page, 1–500 (default 100); anything else is `400 invalid_limit`.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// The `next` of the previous page (opaque, base64url); any other value is
    /// `400 invalid_cursor`.
    #[param(pattern = r"^[A-Za-z0-9_-]+$")]
    pub after: Option<String>,
}

/// A parsed page request: how many rows, after which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Rows to serve.
    pub limit: i64,
    /// Serve rows whose key is greater than this.
    pub after: Option<String>,
}

/// The lists that page, each with its own cursors.
#[derive(Debug, Clone, Copy)]
pub enum List<'a> {
    /// The members of this workspace, by user id.
    Members(&'a str),
    /// The workspaces of this user, by workspace id.
    UserWorkspaces(&'a str),
}

impl List<'_> {
    fn check(&self, key: &str) -> [u8; CHECK_LEN] {
        let (kind, scope) = match self {
            List::Members(workspace) => ("members", *workspace),
            List::UserWorkspaces(user) => ("user_workspaces", *user),
        };
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in [kind, scope, key] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
        let mut check = [0u8; CHECK_LEN];
        check.copy_from_slice(&ctx.finish().as_ref()[..CHECK_LEN]);
        check
    }

    /// The cursor that continues this list after the row with `key`.
    pub fn cursor(&self, key: &str) -> String {
        let mut raw = self.check(key).to_vec();
        raw.extend_from_slice(key.as_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The key inside a cursor this API issued for this list.
    pub fn key(&self, cursor: &str) -> Option<String> {
        let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        if raw.len() <= CHECK_LEN {
            return None;
        }
        let (check, key) = raw.split_at(CHECK_LEN);
        let key = std::str::from_utf8(key).ok()?;
        // The check covers the key and the list; re-encoding must give the cursor
        // back, so no two spellings of one cursor exist.
        (check == self.check(key) && self.cursor(key) == cursor).then(|| key.to_owned())
    }

    /// Reads `limit` and `after` of a request for this list.
    pub fn page(&self, query: &PageQuery) -> Result<Page, HttpError> {
        let limit = parse_limit(query.limit.as_deref())?;
        let after = match query.after.as_deref() {
            None => None,
            Some(cursor) => Some(self.key(cursor).ok_or_else(|| {
                HttpError::bad_request(
                    ErrorCode::InvalidCursor,
                    "after must be a `next` value this API gave for this list",
                )
            })?),
        };
        Ok(Page { limit, after })
    }

    /// Cuts the rows fetched for `page` (one more than its limit, see
    /// [`Page::fetch`]) to the page, with the cursor of the next one when there is one.
    pub fn finish<T>(
        &self,
        page: &Page,
        mut rows: Vec<T>,
        key: impl Fn(&T) -> &str,
    ) -> (Vec<T>, Option<String>) {
        let more = rows.len() as i64 > page.limit;
        rows.truncate(page.limit as usize);
        let next = if more {
            rows.last().map(|row| self.cursor(key(row)))
        } else {
            None
        };
        (rows, next)
    }
}

impl Page {
    /// Rows to fetch: one more than the limit tells whether another page exists.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }
}

/// `limit` of a list: absent means [`DEFAULT_LIMIT`], else an integer 1–[`MAX_LIMIT`].
pub fn parse_limit(raw: Option<&str>) -> Result<i64, HttpError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    match raw.parse::<i64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(HttpError::bad_request(
            ErrorCode::InvalidLimit,
            format!("limit must be an integer from 1 to {MAX_LIMIT}"),
        )),
    }
}

/// The 400 of a query string that is not `limit=…&after=…`.
pub fn invalid_query() -> HttpError {
    HttpError::bad_request(
        ErrorCode::InvalidQuery,
        "query string must be limit=…&after=…",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_within_their_list_only() {
        let members = List::Members("org_1");
        for key in ["user_1", "user_é", "u"] {
            assert_eq!(members.key(&members.cursor(key)).as_deref(), Some(key));
        }
        let cursor = members.cursor("user_1");
        assert_eq!(List::Members("org_2").key(&cursor), None);
        assert_eq!(List::UserWorkspaces("org_1").key(&cursor), None);
    }

    #[test]
    fn edited_cursors_are_refused() {
        let members = List::Members("org_1");
        let cursor = members.cursor("user_100");
        // Every single-character edit, a truncation and an extension fail.
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for i in 0..cursor.len() {
            for c in alphabet.chars() {
                let mut edited: Vec<char> = cursor.chars().collect();
                if edited[i] == c {
                    continue;
                }
                edited[i] = c;
                let edited: String = edited.into_iter().collect();
                assert_eq!(members.key(&edited), None, "{edited}");
            }
        }
        assert_eq!(members.key(&cursor[..cursor.len() - 1]), None);
        assert_eq!(members.key(&format!("{cursor}A")), None);
        assert_eq!(members.key(""), None);
        assert_eq!(members.key("user_100"), None);
        // A plain base64 of the key, without the check, is not a cursor.
        assert_eq!(members.key(&URL_SAFE_NO_PAD.encode("user_100")), None);
    }

    #[test]
    fn limit_defaults_and_bounds() {
        assert_eq!(parse_limit(None).unwrap(), 100);
        assert_eq!(parse_limit(Some("1")).unwrap(), 1);
        assert_eq!(parse_limit(Some("500")).unwrap(), 500);
        for bad in ["0", "501", "-1", "abc", "", "1.5", " 5"] {
            assert_eq!(
                parse_limit(Some(bad)).unwrap_err().code.as_str(),
                "invalid_limit"
            );
        }
    }

    #[test]
    fn finish_cuts_to_the_limit_and_names_the_last_row() {
        let list = List::Members("org_1");
        let page = Page {
            limit: 2,
            after: None,
        };
        let (rows, next) = list.finish(&page, vec!["a", "b", "c"], |r| r);
        assert_eq!(rows, ["a", "b"]);
        assert_eq!(list.key(&next.unwrap()).as_deref(), Some("b"));
        let (rows, next) = list.finish(&page, vec!["a", "b"], |r| r);
        assert_eq!((rows.len(), next), (2, None));
    }
}
