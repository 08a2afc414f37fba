//! Path ids of the read API.
//!
//! Guarantee: an id that cannot name anything — not UTF-8 once percent-decoded,
//! containing a NUL or a control character, empty, or absurdly long — answers the
//! same 404 as an id that names nothing, so odd ids neither reach the database nor
//! tell a caller anything a well-formed unknown id would not. Ids are otherwise
//! taken exactly as sent (case-sensitive, no normalisation).

use axum::extract::{FromRequestParts, Path, RawPathParams};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::http::error::HttpError;

/// Longest id accepted (Clerk ids are ~32 characters).
const MAX_ID: usize = 255;

/// Path parameters, deserialized like `Path<T>` but refused as 404.
#[derive(Debug)]
pub struct Ids<T>(pub T);

impl<T, S> FromRequestParts<S> for Ids<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let raw = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| not_found())?;
        if !raw.iter().all(|(_, value)| plausible(value)) {
            return Err(not_found());
        }
        let Path(value) = Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|_| not_found())?;
        Ok(Ids(value))
    }
}

fn plausible(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID && !id.chars().any(char::is_control)
}

fn not_found() -> HttpError {
    HttpError::not_found("not found")
}

#[cfg(test)]
mod tests {
    use super::plausible;

    #[test]
    fn odd_ids_are_implausible() {
        assert!(plausible("org_2abc"));
        assert!(plausible("..")); // harmless: it is looked up and not found
        assert!(plausible("org_é"));
        assert!(!plausible(""));
        assert!(!plausible("org\0x"));
        assert!(!plausible("org\nx"));
        assert!(!plausible(&"a".repeat(256)));
    }
}
