//! Who is calling: the bearer token (authentication) and the optional acting user.
//!
//! Guarantee: a handler that takes a [`Caller`] never runs without a valid token —
//! tokens are compared in constant time against every configured one (rotation:
//! several are valid at once) — and a present but unusable `X-Acting-User` is
//! refused rather than read as "no acting user", so it can never widen access to
//! the trusted caller's view.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use subtle::{Choice, ConstantTimeEq};

use crate::config::Secret;
use crate::http::AppState;
use crate::http::error::{ErrorCode, HttpError};

/// Header naming the end user the main app acts for.
pub const ACTING_USER: &str = "x-acting-user";

/// Longest acting-user id accepted (Clerk ids are ~32 characters).
const MAX_USER_ID: usize = 255;

/// An authenticated caller of the read API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user the main app acts for (`X-Acting-User`); `None` is the trusted main
    /// app itself, which sees every workspace, deleted ones included.
    pub acting_user: Option<String>,
}

/// Why a request was refused before reaching its handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header, or no configured token matches.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// `X-Acting-User` is present but empty, repeated or not printable ASCII.
    #[error("X-Acting-User must be one user id (printable ASCII)")]
    BadActingUser,
}

/// A read API caller refused before its handler: 401 with a `Bearer` challenge,
/// or 400 for an unusable `X-Acting-User`.
impl From<AuthError> for HttpError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized => Self {
                challenge: Some("Bearer"),
                ..Self::unauthorized(ErrorCode::Unauthorized, e.to_string())
            },
            AuthError::BadActingUser => {
                Self::bad_request(ErrorCode::InvalidActingUser, e.to_string())
            }
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        HttpError::from(self).into_response()
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AuthError> {
        authenticate(&parts.headers, &state.settings.api.tokens)?;
        Ok(Caller {
            acting_user: acting_user(&parts.headers)?,
        })
    }
}

/// Ok when the request carries `Authorization: Bearer <token>` with a configured token.
pub fn authenticate(headers: &HeaderMap, tokens: &[Secret]) -> Result<(), AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(AuthError::Unauthorized);
    };
    let token = bearer_token(value.as_bytes()).ok_or(AuthError::Unauthorized)?;
    if token_matches(token, tokens) {
        Ok(())
    } else {
        Err(AuthError::Unauthorized)
    }
}

/// The token of a `Bearer` credential (scheme case-insensitive, RFC 7235).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares against every token without stopping at the first match, each
/// comparison in constant time, so timing tells nothing about which token or how
/// much of it matched (only the length of a token can show, as `subtle` compares
/// slices of different lengths as unequal at once).
fn token_matches(given: &[u8], tokens: &[Secret]) -> bool {
    let mut matched = Choice::from(0);
    for token in tokens {
        matched |= token.expose().as_bytes().ct_eq(given);
    }
    matched.into()
}

/// The acting user, if the header is present.
fn acting_user(headers: &HeaderMap) -> Result<Option<String>, AuthError> {
    let mut values = headers.get_all(ACTING_USER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::BadActingUser);
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_USER_ID || !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(AuthError::BadActingUser);
    }
    // Checked above: printable ASCII is valid UTF-8.
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};

    fn tokens() -> Vec<Secret> {
        vec![Secret::new("old-token"), Secret::new("new-token")]
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn any_configured_token_authenticates() {
        for t in ["old-token", "new-token"] {
            let h = headers(&[("authorization", &format!("Bearer {t}"))]);
            assert_eq!(authenticate(&h, &tokens()), Ok(()));
        }
    }

    #[test]
    fn scheme_is_case_insensitive_but_token_is_exact() {
        let ok = headers(&[("authorization", "bearer new-token")]);
        assert_eq!(authenticate(&ok, &tokens()), Ok(()));
        for bad in [
            "Bearer NEW-TOKEN",
            "Bearer new-token2",
            "Bearer new-toke",
            "Bearer ",
            "Bearer",
            "Basic new-token",
            "new-token",
        ] {
            let h = headers(&[("authorization", bad)]);
            assert_eq!(
                authenticate(&h, &tokens()),
                Err(AuthError::Unauthorized),
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_or_repeated_authorization_is_refused() {
        assert!(authenticate(&HeaderMap::new(), &tokens()).is_err());
        let h = headers(&[
            ("authorization", "Bearer nope"),
            ("authorization", "Bearer new-token"),
        ]);
        assert!(authenticate(&h, &tokens()).is_err());
    }

    #[test]
    fn acting_user_is_optional_but_never_garbage() {
        assert_eq!(acting_user(&HeaderMap::new()), Ok(None));
        let h = headers(&[(ACTING_USER, "user_2abc")]);
        assert_eq!(acting_user(&h), Ok(Some("user_2abc".into())));
        for bad in ["", "user 1", "user_\t1"] {
            let h = headers(&[(ACTING_USER, bad)]);
            assert_eq!(acting_user(&h), Err(AuthError::BadActingUser), "{bad:?}");
        }
        let twice = headers(&[(ACTING_USER, "user_a"), (ACTING_USER, "user_b")]);
        assert_eq!(acting_user(&twice), Err(AuthError::BadActingUser));
    }

    #[test]
    fn an_unauthenticated_caller_gets_a_bearer_challenge() {
        let r = HttpError::from(AuthError::Unauthorized).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let r = HttpError::from(AuthError::BadActingUser).into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
