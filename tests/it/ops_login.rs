//! The ops console's sign-in and sessions as an attacker and an unlucky operator
//! meet them (issue 19, items 10 and 11): a session ends with the token that
//! opened it and after `[ops] session_max_age_h` however active, and failed
//! sign-ins are throttled per client address (429 with `Retry-After`). From
//! outside, through the real listener, each test with its own database.

use std::net::IpAddr;
use std::time::Duration;

use crate::common::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use reqwest::header::{LOCATION, RETRY_AFTER, SET_COOKIE};

/// A browser of one test: no redirects followed, the session cookie kept by hand,
/// optionally connecting from another loopback address.
#[derive(Debug)]
struct Browser {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
}

/// One answer.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn assert_redirect_to_login(&self, what: &str) {
        assert_eq!(self.status, StatusCode::SEE_OTHER, "{what}: {}", self.body);
        assert_eq!(self.headers[LOCATION], "/ops/login", "{what}");
    }
}

impl Browser {
    fn new(app: &TestApp) -> Self {
        Self::from_address(app, None)
    }

    /// A browser whose connections come from `local` (say 127.0.0.2).
    fn from_address(app: &TestApp, local: Option<IpAddr>) -> Self {
        Self {
            base: app.address.clone(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .local_address(local)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let request = match &self.cookie {
            Some(cookie) => request.header("cookie", cookie),
            None => request,
        };
        let response = request.send().await.expect("request sent");
        Answer {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap(),
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// Posts the login form; keeps the cookie it sets.
    async fn login(&mut self, token: &str, label: &str) -> Answer {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("label", label)
            .finish();
        let answer = self
            .send(
                self.http
                    .post(format!("{}/ops/login", self.base))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body),
            )
            .await;
        if let Some(set) = answer.headers.get(SET_COOKIE) {
            let pair = set.to_str().unwrap().split(';').next().unwrap();
            self.cookie = Some(pair.to_owned());
        }
        answer
    }
}

fn with_ops_tokens(tokens: &str, extra: &[(&str, &str)]) -> TestOptions {
    let mut env = vec![("PROVISIONER_OPS_TOKENS".to_owned(), tokens.to_owned())];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    TestOptions {
        env,
        ..TestOptions::default()
    }
}

async fn sessions_labelled(app: &TestApp, label: &str) -> i64 {
    sqlx::query_scalar("select count(*) from ops_sessions where label = $1")
        .bind(label)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// A session opened with a token is refused (and deleted) at its next request
/// once the service runs without that token, while a session of a token still
/// configured lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_is_removed() {
    let iso = Isolation::new();
    let before = spawn_app_isolated(iso.clone(), with_ops_tokens("token-one,token-two", &[])).await;
    let mut one = Browser::new(&before);
    let mut two = Browser::new(&before);
    assert_eq!(
        one.login("token-one", "one").await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        two.login("token-two", "two").await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(one.get("/ops").await.status, StatusCode::OK);
    assert_eq!(two.get("/ops").await.status, StatusCode::OK);
    // The row keeps the token's SHA-256, never the token.
    let digests: Vec<Vec<u8>> =
        sqlx::query_scalar("select token_digest from ops_sessions order by label")
            .fetch_all(&before.db)
            .await
            .unwrap();
    assert!(digests.iter().all(|d| d.len() == 32), "{digests:?}");
    assert_ne!(digests[0], digests[1]);
    before.stop().await.unwrap();

    // token-one is rotated out: the same database, other settings.
    let after = spawn_app_isolated(iso, with_ops_tokens("token-two,token-three", &[])).await;
    let mut one = Browser {
        base: after.address.clone(),
        ..one
    };
    let two = Browser {
        base: after.address.clone(),
        ..two
    };

    let refused = one.get("/ops").await;
    refused.assert_redirect_to_login("a session of a removed token");
    assert!(
        refused.headers[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0"),
        "the cookie is cleared"
    );
    assert_eq!(
        sessions_labelled(&after, "one").await,
        0,
        "the row is deleted"
    );
    assert_eq!(
        two.get("/ops").await.status,
        StatusCode::OK,
        "token-two's session lives on"
    );
    assert_eq!(sessions_labelled(&after, "two").await, 1);
    // Its forms are refused as well, and the old token no longer signs in.
    one.get("/ops/dead-letters")
        .await
        .assert_redirect_to_login("another page");
    assert_eq!(
        one.login("token-one", "one").await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// A session stored before sessions kept their token's digest (a null
/// `token_digest`) opens nothing, and is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_a_token_digest_is_refused() {
    let app = spawn_app().await;
    let id = [7u8; 32];
    sqlx::query(
        "insert into ops_sessions (id_hash, csrf, label) values (sha256($1), 'csrf', 'old')",
    )
    .bind(&id[..])
    .execute(&app.db)
    .await
    .unwrap();
    let mut browser = Browser::new(&app);
    browser.cookie = Some(format!("ops_session={}", URL_SAFE_NO_PAD.encode(id)));

    browser
        .get("/ops")
        .await
        .assert_redirect_to_login("no digest");
    assert_eq!(sessions_labelled(&app, "old").await, 0);
}

/// A session ends `[ops] session_max_age_h` after its sign-in even while it is
/// used every minute; just before that it is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_after_its_max_age_however_active() {
    let app = spawn_app_with(with_ops_tokens(
        provisioner::config::DEVELOPMENT_OPS_TOKEN,
        &[("PROVISIONER_OPS_SESSION_MAX_AGE_H", "2")],
    ))
    .await;
    let mut browser = Browser::new(&app);
    let token = provisioner::config::DEVELOPMENT_OPS_TOKEN;
    assert_eq!(
        browser.login(token, "alice").await.status,
        StatusCode::SEE_OTHER
    );
    let age = |interval: &'static str| {
        let db = app.db.clone();
        async move {
            // Signed in `interval` ago, last used just now: active, not idle.
            sqlx::query(
                "update ops_sessions set created_at = now() - $1::interval, last_seen_at = now()",
            )
            .bind(interval)
            .execute(&db)
            .await
            .unwrap();
        }
    };

    age("1 hour 59 minutes").await;
    assert_eq!(
        browser.get("/ops").await.status,
        StatusCode::OK,
        "within its lifetime"
    );
    age("2 hours 1 minute").await;
    browser
        .get("/ops")
        .await
        .assert_redirect_to_login("past its lifetime");
    assert_eq!(
        sessions_labelled(&app, "alice").await,
        0,
        "the row is deleted"
    );
}

/// The 11th failed sign-in from one address within a minute answers 429 with
/// `Retry-After`, and so does the right token from that address then (no
/// session); another address still signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_are_throttled_per_client_address() {
    let app = spawn_app().await;
    let token = provisioner::config::DEVELOPMENT_OPS_TOKEN;
    let mut guesser = Browser::new(&app);
    for i in 0..10 {
        let answer = guesser.login(&format!("guess-{i}"), "mallory").await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "guess {i}");
        assert!(answer.headers.get(RETRY_AFTER).is_none());
    }

    let throttled = guesser.login("guess-10", "mallory").await;
    assert_eq!(
        throttled.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        throttled.body
    );
    let retry_after: u64 = throttled.headers[RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(
        throttled.body.contains("Too many failed sign-ins"),
        "{}",
        throttled.body
    );
    assert!(throttled.headers.get(SET_COOKIE).is_none());
    // While throttled, not even the right token is compared.
    let right = guesser.login(token, "mallory").await;
    assert_eq!(right.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(right.headers.get(SET_COOKIE).is_none());
    assert_eq!(sessions_labelled(&app, "mallory").await, 0);

    // Another client address is not limited: a wrong token is a plain 401, and
    // the right one signs in.
    let mut other = Browser::from_address(&app, Some("127.0.0.2".parse().unwrap()));
    assert_eq!(
        other.login("wrong", "bob").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        other.login(token, "bob").await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(other.get("/ops").await.status, StatusCode::OK);
}
