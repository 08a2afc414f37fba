//! Who is operating: the login token, the server-side session behind the cookie,
//! its CSRF token and the one-line result ("flash") of the last action.
//!
//! Guarantee: a console handler that takes an [`Operator`] never runs without a
//! live session — a cookie whose id names a row of `ops_sessions` (by SHA-256; the
//! id itself is stored nowhere) that was seen within [`IDLE_EXPIRY`], was created
//! within `[ops] session_max_age_h` however active it has been since, and was
//! opened with a token that is still configured (the row keeps the token's
//! SHA-256, never the token). A request that finds its session failing any of
//! these deletes the row, so removing a token from `PROVISIONER_OPS_TOKENS` ends
//! the sessions it opened at their next request. Every request bumps
//! `last_seen_at`, logging out deletes the row, so an old cookie opens nothing
//! again. Tokens are compared in constant time against every configured one, and
//! the CSRF token likewise; neither is ever logged.

use aws_lc_rs::digest;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sqlx::PgPool;
use sqlx::types::Json;
use subtle::{ConditionallySelectable, ConstantTimeEq};

pub use super::operator::{Flash, Operator};
use super::view;
use crate::config::{Environment, OpsSettings, Secret};
use crate::http::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "ops_session";
/// A session unused this long is over (checked on every request).
pub const IDLE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
/// Longest operator label kept (characters).
const MAX_LABEL: usize = 64;

impl Operator {
    /// `None` when `given` is this session's CSRF token (compared in constant
    /// time); else the 403 answer, and the caller changes nothing.
    pub fn csrf_refusal(&self, given: Option<&str>) -> Option<Response> {
        let ok = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(self.csrf.as_bytes())));
        if ok {
            None
        } else {
            tracing::warn!(operator = %self.label, "ops: form refused, missing or wrong CSRF token");
            Some(view::forbidden(self))
        }
    }

    /// Stores the result of an action for the next page. A failure to store it is
    /// logged, not raised: the action itself is done.
    pub async fn set_flash(&self, db: &PgPool, flash: Flash) {
        let stored = sqlx::query("update ops_sessions set flash = $2 where id_hash = $1")
            .bind(&self.id_hash)
            .bind(Json(&flash))
            .execute(db)
            .await;
        if let Err(e) = stored {
            tracing::warn!(error = %e, "ops: could not store the result line of an action");
        }
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Some(id) = session_id(&parts.headers) else {
            return Err(to_login(false));
        };
        // A page shows the last result once; a POST leaves it for the page it
        // redirects to.
        let take_flash = parts.method == Method::GET;
        let live = Liveness::of(&state.settings.ops);
        match touch(&state.db, &hash(&id), take_flash, &live).await {
            Ok(Some(operator)) => Ok(operator),
            Ok(None) => Err(to_login(true)),
            Err(e) => {
                tracing::warn!(error = %e, "ops: cannot read the session");
                Err(view::unavailable(
                    "the database does not answer; try again shortly",
                ))
            }
        }
    }
}

/// 303 to the login page; `clear` also expires a cookie that names no live session.
pub fn to_login(clear: bool) -> Response {
    // `Redirect::to` answers 303 See Other.
    let mut response = Redirect::to("/ops/login").into_response();
    if clear {
        response
            .headers_mut()
            .insert(header::SET_COOKIE, expired_cookie());
    }
    response
}

/// The `Set-Cookie` of a new session: only over HTTPS in production, never to
/// scripts, never on a cross-site request, only for the console's paths.
pub fn session_cookie(value: &str, environment: Environment) -> HeaderValue {
    let secure = if environment == Environment::Production {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/ops; HttpOnly; SameSite=Strict{secure}"
    ))
    .expect("base64url and fixed text are a valid header value")
}

/// A `Set-Cookie` that removes the session cookie from the browser.
pub fn expired_cookie() -> HeaderValue {
    HeaderValue::from_static(
        "ops_session=; Path=/ops; HttpOnly; SameSite=Strict; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
    )
}

/// The session id of the request's cookie (its raw 32 bytes), if it carries one
/// that could be an id.
pub fn session_id(headers: &HeaderMap) -> Option<Vec<u8>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .find_map(|(_, value)| {
            URL_SAFE_NO_PAD
                .decode(value.trim())
                .ok()
                .filter(|id| id.len() == 32)
        })
}

fn hash(id: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, id).as_ref().to_vec()
}

/// The SHA-256 of an ops token: what a session keeps of the token that opened it.
pub fn token_digest(token: &Secret) -> Vec<u8> {
    hash(token.expose().as_bytes())
}

/// What keeps a session alive besides its idle time: the tokens configured now
/// (by digest) and the absolute lifetime.
#[derive(Clone)]
pub struct Liveness {
    /// Digests of every configured ops token.
    pub token_digests: Vec<Vec<u8>>,
    /// `[ops] session_max_age_h`.
    pub max_age: std::time::Duration,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A digest of a short token can be reversed by guessing: counted, not shown.
        f.debug_struct("Liveness")
            .field("tokens", &self.token_digests.len())
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl Liveness {
    /// From the `[ops]` settings.
    pub fn of(ops: &OpsSettings) -> Self {
        Self {
            token_digests: ops.tokens.iter().map(token_digest).collect(),
            max_age: std::time::Duration::from_secs(ops.session_max_age_h * 3600),
        }
    }
}

fn random_token() -> Result<String, aws_lc_rs::error::Unspecified> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The 1-based index of the configured token `given` equals, comparing with every
/// token in constant time (only a token's length can show, as with the read API).
pub fn match_token(given: &str, tokens: &[Secret]) -> Option<usize> {
    let mut found = 0u64;
    for (i, token) in tokens.iter().enumerate() {
        let hit = token.expose().as_bytes().ct_eq(given.as_bytes());
        found = u64::conditional_select(&found, &(i as u64 + 1), hit);
    }
    (found > 0).then_some(found as usize)
}

/// The label an operator gives on the login form, cleaned: control characters
/// dropped, trimmed, at most `MAX_LABEL` characters; `None` when nothing is left.
pub fn clean_label(raw: Option<&str>) -> Option<String> {
    let cleaned: String = raw?
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .chars()
        .take(MAX_LABEL)
        .collect();
    let cleaned = cleaned.trim().to_owned();
    (!cleaned.is_empty()).then_some(cleaned)
}

/// A new session for `label`, opened with the token of `token_digest`: its cookie
/// value (the id, base64url), stored as a hash with a fresh CSRF token. Sessions
/// idle past the expiry or older than the lifetime are swept here.
pub async fn create(
    db: &PgPool,
    label: &str,
    token_digest: &[u8],
    live: &Liveness,
) -> anyhow::Result<String> {
    let id = random_token().map_err(|_| anyhow::anyhow!("no randomness for a session id"))?;
    let csrf = random_token().map_err(|_| anyhow::anyhow!("no randomness for a CSRF token"))?;
    let raw = URL_SAFE_NO_PAD.decode(&id)?;
    sqlx::query(
        "delete from ops_sessions \
         where last_seen_at < now() - make_interval(secs => $1) \
            or created_at < now() - make_interval(secs => $2)",
    )
    .bind(IDLE_EXPIRY.as_secs_f64())
    .bind(live.max_age.as_secs_f64())
    .execute(db)
    .await?;
    sqlx::query(
        "insert into ops_sessions (id_hash, csrf, label, token_digest) values ($1, $2, $3, $4)",
    )
    .bind(hash(&raw))
    .bind(csrf)
    .bind(label)
    .bind(token_digest)
    .execute(db)
    .await?;
    Ok(id)
}

/// The live session of `id_hash`, its `last_seen_at` bumped (and its flash taken
/// when `take_flash`); `None` when there is none, or it idled past the expiry, is
/// older than the lifetime or was opened with a token no longer configured (such
/// a row is deleted on the spot).
async fn touch(
    db: &PgPool,
    id_hash: &[u8],
    take_flash: bool,
    live: &Liveness,
) -> sqlx::Result<Option<Operator>> {
    // `old` is the row before the update, so its flash is returned while the row's
    // is cleared in the same statement. A row without a digest (opened before
    // digests were kept) matches no token: `null = any(…)` is not true.
    let row: Option<(String, String, Option<Json<Flash>>)> = sqlx::query_as(
        "update ops_sessions s \
         set last_seen_at = now(), flash = case when $2 then null else s.flash end \
         from (select id_hash, flash from ops_sessions where id_hash = $1 for update) old \
         where s.id_hash = old.id_hash \
           and s.last_seen_at >= now() - make_interval(secs => $3) \
           and s.created_at >= now() - make_interval(secs => $4) \
           and s.token_digest = any($5) \
         returning s.label, s.csrf, old.flash",
    )
    .bind(id_hash)
    .bind(take_flash)
    .bind(IDLE_EXPIRY.as_secs_f64())
    .bind(live.max_age.as_secs_f64())
    .bind(&live.token_digests)
    .fetch_optional(db)
    .await?;
    let Some((label, csrf, flash)) = row else {
        let ended: Option<(String, bool)> = sqlx::query_as(
            "delete from ops_sessions where id_hash = $1 \
             returning label, coalesce(token_digest = any($2), false)",
        )
        .bind(id_hash)
        .bind(&live.token_digests)
        .fetch_optional(db)
        .await?;
        if let Some((label, token_ok)) = ended {
            let why = if token_ok {
                "expired (idle or past [ops] session_max_age_h)"
            } else {
                "its token is no longer configured"
            };
            tracing::info!(operator = %label, "ops console: session ended, {why}");
        }
        return Ok(None);
    };
    Ok(Some(Operator {
        label,
        csrf,
        flash: if take_flash { flash.map(|f| f.0) } else { None },
        id_hash: id_hash.to_vec(),
    }))
}

/// Ends the session for good.
pub async fn delete(db: &PgPool, operator: &Operator) -> sqlx::Result<()> {
    sqlx::query("delete from ops_sessions where id_hash = $1")
        .bind(&operator.id_hash)
        .execute(db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_by_index_and_exactly() {
        let tokens = vec![Secret::new("first"), Secret::new("second")];
        assert_eq!(match_token("first", &tokens), Some(1));
        assert_eq!(match_token("second", &tokens), Some(2));
        for wrong in ["", "firs", "first ", "FIRST", "secondx"] {
            assert_eq!(match_token(wrong, &tokens), None, "{wrong:?}");
        }
    }

    #[test]
    fn labels_are_cleaned_and_bounded() {
        assert_eq!(clean_label(Some("  alice ")).as_deref(), Some("alice"));
        assert_eq!(clean_label(Some("a\nb\u{7}c")).as_deref(), Some("abc"));
        assert_eq!(clean_label(Some(" \t ")), None);
        assert_eq!(clean_label(None), None);
        assert_eq!(clean_label(Some(&"x".repeat(100))).unwrap().len(), 64);
    }

    #[test]
    fn the_cookie_is_read_among_others_and_must_be_an_id() {
        let id = [7u8; 32];
        let value = URL_SAFE_NO_PAD.encode(id);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {COOKIE}={value}")).unwrap(),
        );
        assert_eq!(session_id(&h), Some(id.to_vec()));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("ops_session=short"),
        );
        assert_eq!(session_id(&h), None);
        assert_eq!(session_id(&HeaderMap::new()), None);
    }

    #[test]
    fn the_cookie_is_secure_in_production_only() {
        let dev = session_cookie("abc", Environment::Development);
        let prod = session_cookie("abc", Environment::Production);
        assert_eq!(
            dev.to_str().unwrap(),
            "ops_session=abc; Path=/ops; HttpOnly; SameSite=Strict"
        );
        assert!(prod.to_str().unwrap().ends_with("; Secure"));
    }
}
