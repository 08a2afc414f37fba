//! Svix webhook signatures: verifying what Clerk sends, signing what `send`, the
//! load tools and the benchmarks send.
//!
//! Guarantee: a body verifies only when one configured secret signed exactly these
//! bytes with this id and a timestamp within ±5 minutes — the rules of svix's own
//! `Webhook::verify` — and the comparison takes the same time however much matches.

use aws_lc_rs::hmac;
use axum::http::HeaderMap;
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// Verifies Svix signatures against every configured secret (rotation).
///
/// The rules are exactly those of `svix::webhooks::Webhook::verify` (svix 2.9): the
/// `svix-*` header, else its `webhook-*` twin; an integer timestamp within ±5 minutes
/// of now (inclusive); `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` among the
/// space-separated signatures, compared in constant time; the key is the base64 part
/// of `whsec_…`. Two differences, both deliberate: the HMAC comes from aws-lc (SHA-NI
/// assembly, several times faster than svix's portable SHA-256: docs/benchmarks.md,
/// "Signature check"), and
/// the signature is checked over the raw bytes before the body is looked at, so a
/// non-UTF-8 body is refused as unsigned (401) unless it is signed (then 400), where
/// svix answers "invalid payload" before checking the signature. The unit tests
/// check agreement with svix's own `verify` and `sign`.
pub struct Verifier {
    keys: Vec<hmac::Key>,
    /// The first secret's key, for [`Verifier::sign`] (used by `send`, tests and
    /// load tools); none when it does not decode.
    signer: Option<hmac::Key>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.keys.len())
            .finish()
    }
}

/// Why a request failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A `svix-*`/`webhook-*` header is absent.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// Timestamp unparsable or outside ±5 minutes.
    #[error("timestamp malformed or outside the 5-minute tolerance")]
    Timestamp,
    /// No signature matched any secret (or a header is not visible ASCII).
    #[error("no signature matches")]
    Signature,
    /// The signature matches but the body is not UTF-8, so it cannot be a Clerk event.
    #[error("body is not UTF-8")]
    NotUtf8,
}

/// Svix's tolerance, both directions, inclusive.
const TOLERANCE_SECS: u64 = 5 * 60;

/// `svix-*` first, else `webhook-*`: the order svix reads them in.
fn svix_header<'h>(
    headers: &'h HeaderMap,
    svix: &'static str,
    unbranded: &'static str,
) -> Result<&'h str, VerifyError> {
    headers
        .get(svix)
        .or_else(|| headers.get(unbranded))
        .ok_or(VerifyError::MissingHeader(svix))?
        .to_str()
        .map_err(|_| VerifyError::Signature)
}

fn within_tolerance(ts: i64) -> bool {
    let Ok(now) = std::time::UNIX_EPOCH.elapsed() else {
        return false;
    };
    let now = now.as_secs();
    let Ok(ts) = u64::try_from(ts) else {
        return false;
    };
    ts.saturating_add(TOLERANCE_SECS) >= now && ts <= now.saturating_add(TOLERANCE_SECS)
}

impl Verifier {
    /// One key per configured secret; secrets were validated with the config
    /// (a secret that does not decode is skipped, so it can never match).
    pub fn new(secrets: &[Secret]) -> Self {
        let key = |s: &Secret| {
            let b64 = s.expose().strip_prefix("whsec_").unwrap_or(s.expose());
            let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            (!raw.is_empty()).then(|| hmac::Key::new(hmac::HMAC_SHA256, &raw))
        };
        Self {
            keys: secrets.iter().filter_map(key).collect(),
            signer: secrets.first().and_then(key),
        }
    }

    /// Ok when any secret verifies the body and headers within ±5 minutes.
    pub fn verify(&self, body: &[u8], headers: &HeaderMap) -> Result<(), VerifyError> {
        let id = svix_header(headers, "svix-id", "webhook-id")?;
        let signatures = svix_header(headers, "svix-signature", "webhook-signature")?;
        let ts = svix_header(headers, "svix-timestamp", "webhook-timestamp")?;
        let ts: i64 = ts.parse().map_err(|_| VerifyError::Timestamp)?;
        if !within_tolerance(ts) {
            return Err(VerifyError::Timestamp);
        }
        // svix signs the timestamp as re-formatted from the integer.
        let ts = ts.to_string();
        let candidates = || {
            signatures
                .split(' ')
                .filter_map(|s| s.split_once(','))
                .filter(|(version, _)| *version == "v1")
                .map(|(_, sig)| sig.as_bytes())
        };
        let mut expected = [0u8; 44];
        let verified = self.keys.iter().any(|key| {
            let mut ctx = hmac::Context::with_key(key);
            ctx.update(id.as_bytes());
            ctx.update(b".");
            ctx.update(ts.as_bytes());
            ctx.update(b".");
            ctx.update(body);
            let tag = ctx.sign();
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(tag.as_ref(), &mut expected)
                .expect("44 bytes hold the base64 of 32");
            let expected = &expected[..n];
            // Every candidate is compared (no early exit on a match within a key).
            candidates().fold(false, |found, sig| {
                found | (sig.len() == expected.len() && bool::from(sig.ct_eq(expected)))
            })
        });
        if !verified {
            return Err(VerifyError::Signature);
        }
        if std::str::from_utf8(body).is_err() {
            return Err(VerifyError::NotUtf8);
        }
        Ok(())
    }

    /// Signs a body with the first secret, as Svix does (for `send`, tests and
    /// load): `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    pub fn sign(&self, svix_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
        let mut ctx = hmac::Context::with_key(self.signer.as_ref()?);
        ctx.update(svix_id.as_bytes());
        ctx.update(b".");
        ctx.update(timestamp.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        let tag = ctx.sign();
        Some(format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;
    use svix::webhooks::Webhook;

    const A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const B: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    fn now() -> i64 {
        std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64
    }

    fn headers(prefix: &str, id: &str, ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in [("id", id), ("timestamp", ts), ("signature", sig)] {
            h.insert(
                axum::http::HeaderName::try_from(format!("{prefix}-{name}")).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn svix_ok(secrets: &[&str], body: &[u8], h: &HeaderMap) -> bool {
        secrets
            .iter()
            .any(|s| Webhook::new(s).unwrap().verify(body, h).is_ok())
    }

    fn verifier(secrets: &[&str]) -> Verifier {
        Verifier::new(&secrets.iter().map(|s| Secret::new(*s)).collect::<Vec<_>>())
    }

    #[test]
    fn accepts_what_svix_signs_with_either_header_prefix() {
        let body = br#"{"type":"organization.created","data":{}}"#;
        let ts = now();
        let sig = Webhook::new(A).unwrap().sign("msg_1", ts, body).unwrap();
        let v = verifier(&[A]);
        for prefix in ["svix", "webhook"] {
            let h = headers(prefix, "msg_1", &ts.to_string(), &sig);
            assert_eq!(v.verify(body, &h), Ok(()), "{prefix}-*");
        }
        assert_eq!(v.sign("msg_1", ts, body).unwrap(), sig, "signs like svix");
    }

    #[test]
    fn a_non_utf8_body_is_unsigned_unless_its_signature_matches() {
        let body = b"{\"type\":\"x\",\"data\":{\"name\":\"\xff\xfe\"}}";
        let ts = now();
        let v = verifier(&[A]);
        let unsigned = headers("svix", "msg_1", &ts.to_string(), "v1,AAAA");
        assert_eq!(v.verify(body, &unsigned), Err(VerifyError::Signature));

        let raw = base64::engine::general_purpose::STANDARD
            .decode(A.trim_start_matches("whsec_"))
            .unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, &raw);
        let mut content = format!("msg_1.{ts}.").into_bytes();
        content.extend_from_slice(body);
        let sig = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, &content))
        );
        let signed = headers("svix", "msg_1", &ts.to_string(), &sig);
        assert_eq!(v.verify(body, &signed), Err(VerifyError::NotUtf8));
    }

    #[test]
    fn missing_headers_are_named() {
        let v = verifier(&[A]);
        let full = headers("svix", "msg_1", &now().to_string(), "v1,x");
        for name in ["svix-id", "svix-timestamp", "svix-signature"] {
            let mut h = full.clone();
            h.remove(name);
            assert_eq!(v.verify(b"{}", &h), Err(VerifyError::MissingHeader(name)));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The verifier accepts exactly what svix's own `verify` accepts.
        #[test]
        fn agrees_with_svix(
            body in "[ -~]{0,300}",
            id in "msg_[a-zA-Z0-9]{1,24}",
            // Away from the ±300 s edges: the clock moves between the two checks.
            offset in prop_oneof![-1000i64..-302, -297i64..297, 302i64..1000],
            signer in 0usize..3,
            configured in prop_oneof![Just(vec![A]), Just(vec![B]), Just(vec![A, B])],
            tamper in 0usize..6,
            webhook_prefix in any::<bool>(),
        ) {
            let ts = now() + offset;
            let secret = [A, B, "whsec_dGhpcmQtc2VjcmV0LW5vdC1jb25maWd1cmVk"][signer];
            let mut sig = Webhook::new(secret).unwrap().sign(&id, ts, body.as_bytes()).unwrap();
            let mut body = body.into_bytes();
            let mut ts_header = ts.to_string();
            match tamper {
                1 => body.push(b' '),
                2 => sig = format!("v1,{}", "A".repeat(44)),
                3 => sig = format!("v2,{}", &sig[3..]),
                4 => sig = format!("v1,bm9ldHUj v1a,xyz {sig}"),
                5 => ts_header = format!("{ts}x"),
                _ => {}
            }
            let prefix = if webhook_prefix { "webhook" } else { "svix" };
            let h = headers(prefix, &id, &ts_header, &sig);
            let ours = verifier(&configured).verify(&body, &h).is_ok();
            prop_assert_eq!(ours, svix_ok(&configured, &body, &h));
        }
    }
}
