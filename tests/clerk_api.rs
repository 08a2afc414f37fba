//! The Backend API client against a local fake of Clerk: paging, pacing,
//! retries, and the secret key kept out of every error.

mod common;

use std::time::{Duration, Instant};

use common::fake_clerk::{FakeClerk, Scripted};
use provisioner::clerk::api::{API_VERSION, ClerkApi, ClerkError, Memberships};
use provisioner::config::{ClerkSettings, ReconcileSettings, Secret};
use provisioner::ops::send::payload::{Person, membership, organization};

const KEY: &str = "sk_test_fake_clerk_key_0123456789";

fn client(fake: &FakeClerk, key: &str, rps: f64) -> ClerkApi {
    let clerk = ClerkSettings {
        webhook_secrets: Vec::new(),
        instance_id: None,
        secret_key: Some(Secret::new(key)),
        api_url: fake.url.clone(),
    };
    let reconcile = ReconcileSettings {
        requests_per_second: rps,
        max_removals: 50,
        interval_s: 0,
    };
    ClerkApi::new(&clerk, &reconcile).unwrap()
}

fn org(n: i64) -> serde_json::Value {
    let id = format!("org_fake{n:05}");
    organization(
        &id,
        &format!("Org {n}"),
        "user_creator",
        1_700_000_000_000 + n,
        1_700_000_000_000 + n,
        1,
    )
}

#[tokio::test]
async fn pages_follow_offset_oldest_first_with_the_version_header() {
    let fake = FakeClerk::start(KEY).await;
    for n in (0..7).rev() {
        fake.put_organization(org(n));
    }
    let api = client(&fake, KEY, 0.0);
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let page = api.organizations(offset, 3).await.unwrap();
        assert_eq!(page.total_count, 7);
        offset += page.data.len() as u64;
        seen.extend(
            page.data
                .iter()
                .map(|o| o["id"].as_str().unwrap().to_owned()),
        );
        if offset >= page.total_count {
            break;
        }
    }
    let expected: Vec<String> = (0..7).map(|n| format!("org_fake{n:05}")).collect();
    assert_eq!(seen, expected, "oldest first, each once");
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert!(
        requests
            .iter()
            .all(|r| r.version.as_deref() == Some(API_VERSION))
    );
    assert!(
        requests[0].query.contains("\"+created_at\""),
        "{:?}",
        requests[0]
    );
}

#[tokio::test]
async fn a_missing_organization_is_none_and_its_memberships_too() {
    let fake = FakeClerk::start(KEY).await;
    let o = org(1);
    fake.put_organization(o.clone());
    fake.put_membership(membership(
        "orgmem_fake1",
        o.clone(),
        &Person::of("user_fake1"),
        "org:admin",
        1_700_000_000_100,
        1_700_000_000_100,
    ));
    let api = client(&fake, KEY, 0.0);
    assert_eq!(api.organization("org_fake00001").await.unwrap(), Some(o));
    assert_eq!(api.organization("org_nope").await.unwrap(), None);
    let page = api
        .memberships(Memberships::Of("org_fake00001"), 0, 500)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page.total_count, 1);
    assert!(
        api.memberships(Memberships::Of("org_nope"), 0, 500)
            .await
            .unwrap()
            .is_none()
    );
    let all = api
        .memberships(Memberships::All, 0, 500)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all.data.len(), 1);
}

#[tokio::test]
async fn a_429_is_waited_out_for_its_retry_after() {
    let fake = FakeClerk::start(KEY).await;
    fake.put_organization(org(1));
    fake.fail_next([Scripted {
        status: 429,
        retry_after: Some(2),
    }]);
    let api = client(&fake, KEY, 0.0);
    let start = Instant::now();
    let page = api.organizations(0, 10).await.unwrap();
    assert_eq!(page.data.len(), 1);
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(2),
        "retried after {gap:?}, Retry-After said 2 s"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_500_is_retried_with_backoff_then_succeeds() {
    let fake = FakeClerk::start(KEY).await;
    fake.put_organization(org(1));
    fake.fail_next([
        Scripted {
            status: 500,
            retry_after: None,
        },
        Scripted {
            status: 503,
            retry_after: None,
        },
    ]);
    let api = client(&fake, KEY, 0.0);
    let page = api.organizations(0, 10).await.unwrap();
    assert_eq!(page.data.len(), 1);
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn a_wrong_key_fails_at_once_without_the_key_in_the_error() {
    let fake = FakeClerk::start(KEY).await;
    let wrong = "sk_test_wrong_key_must_not_leak";
    let api = client(&fake, wrong, 0.0);
    let err = api.organizations(0, 10).await.unwrap_err();
    assert!(matches!(err, ClerkError::Refused(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("CLERK_SECRET_KEY was refused"), "{text}");
    assert!(text.contains("authentication_invalid"), "{text}");
    assert!(!text.contains(wrong) && !format!("{err:?}").contains(wrong));
    assert!(!format!("{api:?}").contains(wrong));
    assert_eq!(fake.requests().len(), 1, "401 is not retried");
}

#[tokio::test]
async fn a_client_error_is_one_line_with_code_and_trace() {
    let fake = FakeClerk::start(KEY).await;
    let api = client(&fake, KEY, 0.0);
    // A 4xx other than 401/403/404/429 is not retried: it is reported in one line.
    fake.fail_next([Scripted {
        status: 422,
        retry_after: None,
    }]);
    let err = api.organizations(0, 10).await.unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains("422") && err.contains("clerk_trace_id trace_fake_0001"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_clerk_is_unavailable_after_bounded_retries() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let clerk = ClerkSettings {
        webhook_secrets: Vec::new(),
        instance_id: None,
        secret_key: Some(Secret::new(KEY)),
        api_url: url,
    };
    let reconcile = ReconcileSettings {
        requests_per_second: 0.0,
        max_removals: 50,
        interval_s: 0,
    };
    let api = ClerkApi::new(&clerk, &reconcile).unwrap();
    let err = api.organization("org_x").await.unwrap_err();
    assert!(matches!(err, ClerkError::Unavailable { .. }), "{err:?}");
    assert!(!err.to_string().contains(KEY));
}

#[tokio::test]
async fn calls_share_one_rate_limit() {
    let fake = FakeClerk::start(KEY).await;
    fake.put_organization(org(1));
    let api = client(&fake, KEY, 4.0);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                api.organization("org_fake00001").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 12 calls at 4/s with a burst of 4: at least 2 s, whatever the task count.
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
}
