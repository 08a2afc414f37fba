//! The Backend API client against a local fake of Clerk: paging, pacing,
//! retries, and the secret key kept out of every error.

use std::time::{Duration, Instant};

use provisioner::clerk::api::{API_VERSION, ClerkApi, ClerkError, Memberships};
use provisioner::clerk::fake::{FakeClerk, INSTANCE_ID, Scripted};
use provisioner::clerk::sample::{Person, membership, organization};
use provisioner::config::{ClerkSettings, ReconcileSettings, Secret};

const KEY: &str = "sk_test_fake_clerk_key_0123456789";

fn client(fake: &FakeClerk, key: &str, rps: f64) -> ClerkApi {
    client_of(fake, key, rps, None)
}

/// A client whose `CLERK_INSTANCE_ID` is `instance_id`.
fn client_of(fake: &FakeClerk, key: &str, rps: f64, instance_id: Option<&str>) -> ClerkApi {
    let clerk = ClerkSettings {
        webhook_secrets: Vec::new(),
        instance_id: instance_id.map(str::to_owned),
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

/// Paging by offset returns every organization once, oldest first, each request with the
/// `Clerk-API-Version` header.
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

/// A 404 organization reads as `None`, and so do its memberships; an existing one comes
/// back whole.
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

/// A 429 is waited out for its `Retry-After` before the request is sent again.
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

/// A 500 is retried, and the call succeeds once Clerk answers.
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

/// A wrong key (401) fails at once, without retries, and the error never contains the key.
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

/// A 4xx becomes a one-line error naming Clerk's code and trace id.
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

/// An unreachable Clerk is reported unavailable after a bounded number of retries, not
/// retried forever.
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

/// Concurrent calls share one rate limit: 12 calls at 4/s take at least 2 s,
/// however many tasks make them.
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

fn instance_requests(fake: &FakeClerk) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.path == "/v1/instance")
        .count()
}

/// With `CLERK_INSTANCE_ID` set, the key's instance is asked once per process:
/// a key of another instance is refused in one line naming both settings (and
/// never the key), the key of the configured one passes, and without the
/// setting nothing is asked.
#[tokio::test]
async fn the_key_instance_is_checked_once_against_clerk_instance_id() {
    let fake = FakeClerk::start(KEY).await;
    let other = client_of(&fake, KEY, 0.0, Some("ins_production"));
    for _ in 0..2 {
        let err = other.check_instance().await.unwrap_err();
        assert!(matches!(err, ClerkError::WrongInstance { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("CLERK_SECRET_KEY")
                && text.contains("CLERK_INSTANCE_ID")
                && text.contains("ins_production")
                && text.contains(INSTANCE_ID),
            "{text}"
        );
        assert!(!text.contains('\n') && !text.contains(KEY), "{text}");
    }
    assert_eq!(instance_requests(&fake), 1, "asked once, the answer kept");

    let same = client_of(&fake, KEY, 0.0, Some(INSTANCE_ID));
    same.check_instance().await.unwrap();
    same.check_instance().await.unwrap();
    assert_eq!(instance_requests(&fake), 2);

    client(&fake, KEY, 0.0).check_instance().await.unwrap();
    assert_eq!(
        instance_requests(&fake),
        2,
        "no CLERK_INSTANCE_ID: nothing asked"
    );
}

/// A Backend API without `GET /v1/instance` (404) does not block the key; a
/// failure to ask is not kept, so the next check asks again.
#[tokio::test]
async fn an_unknown_instance_route_does_not_block_and_failures_are_not_kept() {
    let fake = FakeClerk::start(KEY).await;
    let api = client_of(&fake, KEY, 0.0, Some("ins_production"));
    fake.fail_next((0..6).map(|_| Scripted {
        status: 503,
        retry_after: None,
    }));
    let err = api.check_instance().await.unwrap_err();
    assert!(matches!(err, ClerkError::Unavailable { .. }), "{err:?}");
    fake.set_instance(None);
    api.check_instance().await.unwrap();
    api.check_instance().await.unwrap();
    assert_eq!(
        instance_requests(&fake),
        7,
        "six failures, then one 404 kept"
    );
}

/// Memberships asked by user id: at most 100 `user_id` a call, only those
/// users' memberships of that organization, `None` for an organization Clerk
/// does not have.
#[tokio::test]
async fn memberships_are_asked_by_user_at_most_100_a_call() {
    let fake = FakeClerk::start(KEY).await;
    let o = org(1);
    let other = org(2);
    fake.put_organization(o.clone());
    fake.put_organization(other.clone());
    for n in 0..150 {
        fake.put_membership(membership(
            &format!("orgmem_u{n:03}"),
            o.clone(),
            &Person::of(&format!("user_u{n:03}")),
            "org:member",
            1_700_000_000_100,
            1_700_000_000_100,
        ));
    }
    // The same user in another organization is not an answer.
    fake.put_membership(membership(
        "orgmem_other",
        other,
        &Person::of("user_u000"),
        "org:member",
        1_700_000_000_100,
        1_700_000_000_100,
    ));
    let api = client(&fake, KEY, 0.0);
    let mut users: Vec<String> = (0..150)
        .step_by(2)
        .map(|n| format!("user_u{n:03}"))
        .collect();
    users.extend((0..60).map(|n| format!("user_gone{n}")));
    let asked: Vec<&str> = users.iter().map(String::as_str).collect();
    let found = api
        .memberships_of_users("org_fake00001", &asked)
        .await
        .unwrap()
        .expect("the organization exists");
    let mut ids: Vec<&str> = found.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort();
    let expected: Vec<String> = (0..150)
        .step_by(2)
        .map(|n| format!("orgmem_u{n:03}"))
        .collect();
    assert_eq!(ids, expected);
    let calls: Vec<usize> = fake
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/organizations/org_fake00001/memberships")
        .map(|r| r.query.matches("user_id=").count())
        .collect();
    assert_eq!(calls, vec![100, 35], "135 users in two calls");
    assert!(
        api.memberships_of_users("org_nope", &["user_u000"])
            .await
            .unwrap()
            .is_none()
    );
}

/// Organizations asked by id: only those Clerk lists among the ids.
#[tokio::test]
async fn organizations_are_listed_by_id() {
    let fake = FakeClerk::start(KEY).await;
    for n in 0..5 {
        fake.put_organization(org(n));
    }
    let api = client(&fake, KEY, 0.0);
    let found = api
        .organizations_with_ids(&["org_fake00001", "org_fake00003", "org_gone"])
        .await
        .unwrap();
    let ids: Vec<&str> = found.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["org_fake00001", "org_fake00003"]);
}
