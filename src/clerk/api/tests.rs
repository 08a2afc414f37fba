//! The Backend API client's unit tests: error descriptions, `Retry-After`, and a key
//! or credentials that never reach an error or `Debug`.

use super::*;

#[test]
fn clerk_errors_become_one_line() {
    let body = br#"{"errors":[{"message":"not found","long_message":"No organization\nwas found","code":"resource_not_found","meta":{}}],"clerk_trace_id":"abc123"}"#;
    assert_eq!(
        describe(body),
        "resource_not_found: No organization was found (clerk_trace_id abc123)"
    );
    assert_eq!(describe(b""), "no error body");
    assert_eq!(
        describe(b"<html>\n bad gateway</html>"),
        "<html> bad gateway</html>"
    );
}

#[test]
fn retry_after_is_seconds_capped() {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
    assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
    headers.insert(reqwest::header::RETRY_AFTER, "86400".parse().unwrap());
    assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
    headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
    assert_eq!(retry_after(&headers), None);
}

#[test]
fn debug_never_shows_the_key() {
    let clerk = ClerkSettings {
        webhook_secrets: Vec::new(),
        instance_id: None,
        secret_key: Some(Secret::new("sk_test_very_secret")),
        api_url: "http://127.0.0.1:1".into(),
    };
    let reconcile = ReconcileSettings {
        requests_per_second: 5.0,
        max_removals: 50,
        interval_s: 0,
    };
    let api = ClerkApi::new(&clerk, &reconcile).unwrap();
    let printed = format!("{api:?}");
    assert!(!printed.contains("very_secret"), "{printed}");
}

/// A base URL with credentials (the settings refuse one; this is the second
/// guard) never reaches an error or `Debug`: neither user-info nor a password
/// parameter nor an unparsable value.
#[tokio::test]
async fn credentials_in_the_base_url_never_reach_errors_or_debug() {
    let reconcile = ReconcileSettings {
        requests_per_second: 0.0,
        max_removals: 50,
        interval_s: 0,
    };
    let clerk = |url: &str| ClerkSettings {
        webhook_secrets: Vec::new(),
        instance_id: None,
        secret_key: Some(Secret::new("sk_test_key")),
        api_url: url.into(),
    };
    let api = ClerkApi::new(
        &clerk("http://user_hunter9:hunter9@127.0.0.1:1/?password=hunter9"),
        &reconcile,
    )
    .unwrap();
    let printed = format!("{api:?}");
    assert!(!printed.contains("hunter9"), "{printed}");
    assert!(printed.contains("127.0.0.1"), "{printed}");
    let err = ClerkApi::new(&clerk("http://u:hunter9@[::1"), &reconcile).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter9"), "{err}");
    // A base that cannot carry a path fails at once, quoting the base.
    let api = ClerkApi::new(&clerk("mailto:u:hunter9@clerk"), &reconcile).unwrap();
    let err = api.organization("org_1").await.unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter9"), "{err}");
}
