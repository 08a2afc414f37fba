//! The ops console (`/ops`, issue 13): every route from outside, against the real
//! PostgreSQL and RabbitMQ, each test with its own database and broker names —
//! sessions, CSRF, confirm steps, escaping, security headers, audit rows, and the
//! isolation of ops and read-API credentials.

use provisioner::clerk::fake::FakeClerk;
use std::time::Duration;

use crate::common::ops::{
    Inject, Served, assert_intact, header, inject_dead, inject_dead_routed, many_letters,
    message_ids, reset_peak, resident,
};
use crate::common::story::{org, person};
use crate::common::*;
use provisioner::dead_letters::{DeadQueue, Selection};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

const OPS_TOKEN: &str = provisioner::config::DEVELOPMENT_OPS_TOKEN;
const CLERK_KEY: &str = "sk_test_ops_console_fake_key_0123";
const T0: i64 = 1_750_000_000_000;
/// Ops tokens of a production test app (32 characters or more).
const PROD_OPS_1: &str = "prod-ops-1-0123456789abcdefghijklmn";
const PROD_OPS_2: &str = "prod-ops-2-0123456789abcdefghijklmn";

/// The exact policy the issue asks for.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A browser-like client of one test app: no redirects followed, the session
/// cookie kept by hand so tests can see and replay it.
struct Console {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
}

/// One answer: status, headers, body.
#[derive(Debug)]
struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The CSRF token of the page's forms.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find(r#"name="csrf" value=""#)
            .unwrap_or_else(|| panic!("no csrf input in {}", self.body));
        let rest = &self.body[at + r#"name="csrf" value=""#.len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }

    /// The value of the page's hidden input `name` (HTML entities decoded).
    fn hidden(&self, name: &str) -> String {
        let start = format!(r#"type="hidden" name="{name}" value=""#);
        let at = self
            .body
            .find(&start)
            .unwrap_or_else(|| panic!("no hidden {name} in {}", self.body));
        let rest = &self.body[at + start.len()..];
        rest[..rest.find('"').unwrap()]
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&#39;", "'")
            .replace("&amp;", "&")
    }

    fn assert_redirect_to_login(&self, what: &str) {
        assert_eq!(self.status, StatusCode::SEE_OTHER, "{what}: {}", self.body);
        assert_eq!(self.location(), "/ops/login", "{what}");
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

impl Console {
    fn new(app: &TestApp) -> Self {
        Self::at(&app.address)
    }

    /// A console of the server at `base`.
    fn at(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", c),
            None => req,
        };
        let r = req.send().await.expect("request sent");
        Page {
            status: r.status(),
            headers: r.headers().clone(),
            body: r.text().await.unwrap(),
        }
    }

    async fn get(&self, path: &str) -> Page {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(fields)),
        )
        .await
    }

    /// Sends a GET (or a POST of `fields`) and goes away after `after`, whatever
    /// the answer: a client that disconnects mid-request.
    async fn abandon(&self, path: &str, fields: Option<&[(&str, &str)]>, after: Duration) {
        let url = format!("{}{path}", self.base);
        let req = match fields {
            None => self.http.get(url),
            Some(fields) => self
                .http
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(fields)),
        };
        let req = match &self.cookie {
            Some(c) => req.header("cookie", c),
            None => req,
        };
        let _ = tokio::time::timeout(after, req.send()).await;
    }

    /// Signs in; keeps the cookie.
    async fn login(&mut self, token: &str, label: &str) -> Page {
        let page = self
            .post("/ops/login", &[("token", token), ("label", label)])
            .await;
        if let Some(set) = page.headers.get(SET_COOKIE) {
            let pair = set.to_str().unwrap().split(';').next().unwrap().to_owned();
            self.cookie = Some(pair);
        }
        page
    }

    /// A signed-in console and the session's CSRF token.
    async fn signed_in(app: &TestApp, label: &str) -> (Self, String) {
        let mut console = Self::new(app);
        let page = console.login(OPS_TOKEN, label).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
        let csrf = console.get("/ops/events").await.csrf();
        (console, csrf)
    }
}

fn msg_id() -> String {
    format!("msg_{}", random_id(20))
}

/// A dead letter as the worker leaves one (payload class).
fn dead(kind: &str, org: &str, id: &str) -> Inject {
    Inject::event(kind, org, id).worker_headers(
        "payload",
        "data.public_user_data is missing",
        1,
        1_716_883_201_500,
    )
}

async fn audit_rows(app: &TestApp) -> Vec<(Option<String>, String, String, Option<String>, Value)> {
    sqlx::query_as::<
        _,
        (
            Option<String>,
            String,
            String,
            Option<String>,
            sqlx::types::Json<Value>,
        ),
    >("select workspace_id, action, actor, event_id, details from audit_log order by id")
    .fetch_all(&app.db)
    .await
    .unwrap()
    .into_iter()
    .map(|(w, a, actor, e, d)| (w, a, actor, e, d.0))
    .collect()
}

async fn dead_ids(app: &TestApp) -> Vec<String> {
    let listing = provisioner::dead_letters::list(&app.settings)
        .await
        .unwrap();
    listing.data.into_iter().filter_map(|l| l.id).collect()
}

/// Without a session every page and every form answers 303 to the login, and the
/// forms change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_route_redirects_to_the_login_without_a_session() {
    let app = spawn_app().await;
    let id = msg_id();
    inject_dead(&app.settings, &[dead("organization.created", "org_a", &id)]).await;
    let anonymous = Console::new(&app);

    for path in [
        "/ops".to_owned(),
        "/ops/dead-letters".to_owned(),
        format!("/ops/dead-letters/{id}"),
        "/ops/events?id=x".to_owned(),
        "/ops/workspaces/org_a".to_owned(),
        "/ops/no-such-page".to_owned(),
    ] {
        anonymous.get(&path).await.assert_redirect_to_login(&path);
    }
    for path in [
        format!("/ops/dead-letters/{id}/replay"),
        format!("/ops/dead-letters/{id}/purge"),
        "/ops/dead-letters/replay".to_owned(),
        "/ops/workspaces/org_a/sync".to_owned(),
        "/ops/logout".to_owned(),
    ] {
        let page = anonymous
            .post(&path, &[("csrf", "x"), ("confirm", "yes")])
            .await;
        page.assert_redirect_to_login(&path);
    }
    // A made-up cookie is no session either (and is cleared).
    let mut forged = Console::new(&app);
    forged.cookie = Some(format!("ops_session={}", "A".repeat(43)));
    let page = forged.get("/ops").await;
    page.assert_redirect_to_login("forged cookie");
    assert!(
        page.headers[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );

    assert_eq!(dead_ids(&app).await, [id], "nothing replayed or purged");
    assert!(audit_rows(&app).await.is_empty());
    // The login page itself is public.
    let login = anonymous.get("/ops/login").await;
    assert_eq!(login.status, StatusCode::OK);
    assert!(login.body.contains(r#"name="token""#), "{}", login.body);
}

/// A wrong token answers 401 with the form again and sets no cookie; a right one a
/// session cookie (HttpOnly, SameSite=Strict, Path=/ops, not Secure in development)
/// and 303 to /ops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_refuses_a_wrong_token_and_sets_a_strict_cookie_for_a_right_one() {
    let app = spawn_app().await;
    let mut console = Console::new(&app);

    for wrong in ["", "nope", &OPS_TOKEN[..OPS_TOKEN.len() - 1], TOKEN] {
        let page = console.login(wrong, "mallory").await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
        assert!(
            page.headers.get(SET_COOKIE).is_none(),
            "{wrong:?}: no cookie"
        );
        assert!(
            page.body.contains(r#"action="/ops/login""#),
            "the form again"
        );
        assert!(page.body.contains("does not open the console"));
    }
    // No form at all (no body, or another content type) is a wrong token too.
    for request in [
        console.http.post(format!("{}/ops/login", console.base)),
        console
            .http
            .post(format!("{}/ops/login", console.base))
            .header("content-type", "application/json")
            .body(format!(r#"{{"token":"{OPS_TOKEN}"}}"#)),
    ] {
        let page = console.send(request).await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{}", page.body);
        assert!(page.headers.get(SET_COOKIE).is_none(), "no cookie");
        assert!(
            page.body.contains(r#"action="/ops/login""#),
            "the form again"
        );
    }
    let sessions: i64 = sqlx::query_scalar("select count(*) from ops_sessions")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(sessions, 0);

    let page = console.login(OPS_TOKEN, "").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), "/ops");
    let cookie = page.headers[SET_COOKIE].to_str().unwrap().to_owned();
    let attributes: Vec<&str> = cookie.split("; ").skip(1).collect();
    assert_eq!(
        attributes,
        ["Path=/ops", "HttpOnly", "SameSite=Strict"],
        "{cookie}"
    );
    // The cookie's value (256 random bits) is stored only as its SHA-256.
    let value = cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("ops_session=");
    assert_eq!(value.len(), 43, "32 bytes, base64url");
    let (hash, label): (Vec<u8>, String) =
        sqlx::query_as("select id_hash, label from ops_sessions")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(hash.len(), 32);
    assert!(!String::from_utf8_lossy(&hash).contains(value));
    assert_eq!(label, "ops token 1", "no label given: the token's index");
    let overview = console.get("/ops").await;
    assert_eq!(overview.status, StatusCode::OK, "{}", overview.body);
    assert!(overview.body.contains("ops token 1"));
}

/// In production the cookie is also Secure (and the development token is refused,
/// so the app runs with its own tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_secure_in_production() {
    let app = spawn_app_with(TestOptions {
        env: vec![
            ("PROVISIONER_ENV".into(), "production".into()),
            (
                "CLERK_WEBHOOK_SECRET".into(),
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            ),
            // Production tokens are 32 characters or more.
            (
                "PROVISIONER_API_TOKENS".into(),
                "prod-api-token-0123456789abcdefghij".into(),
            ),
            (
                "PROVISIONER_OPS_TOKENS".into(),
                format!("{PROD_OPS_1},{PROD_OPS_2}"),
            ),
        ],
        ..TestOptions::default()
    })
    .await;
    let mut console = Console::new(&app);
    let refused = console.login(OPS_TOKEN, "").await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "the dev token is not one"
    );
    let page = console.login(PROD_OPS_2, "alice").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    let cookie = page.headers[SET_COOKIE].to_str().unwrap();
    assert!(
        cookie.ends_with("; HttpOnly; SameSite=Strict; Secure"),
        "{cookie}"
    );
    let label: String = sqlx::query_scalar("select label from ops_sessions")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(label, "alice");
}

/// Every console answer carries the CSP without inline scripts and the other
/// headers; the page loads only the binary's own CSS and JS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_response_carries_the_security_headers() {
    let app = spawn_app().await;
    let (console, _) = Console::signed_in(&app, "alice").await;
    let anonymous = Console::new(&app);
    let pages = [
        anonymous.get("/ops/login").await,
        anonymous.get("/ops").await,
        anonymous.post("/ops/login", &[("token", "bad")]).await,
        anonymous.get("/ops/static/ops.css").await,
        anonymous.get("/ops/static/ops.js").await,
        console.get("/ops").await,
        console.get("/ops/dead-letters").await,
        console.get("/ops/events").await,
        console.get("/ops/workspaces/org_none").await,
        console.get("/ops/nothing-here").await,
        console.post("/ops/workspaces/org_none/sync", &[]).await,
    ];
    for page in &pages {
        let h = &page.headers;
        assert_eq!(h["content-security-policy"], CSP, "{page:?}");
        assert!(!CSP.contains("unsafe-inline"));
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "same-origin");
        assert_eq!(h["cache-control"], "no-store");
    }
    let html = &pages[5].body;
    assert!(html.contains(r#"<script src="/ops/static/ops.js" defer></script>"#));
    assert!(!html.contains("<script>"), "no inline script");
    assert!(!html.contains("style="), "no inline style");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no third-party asset"
    );
    assert!(
        pages[3].headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    assert!(pages[3].body.contains("table.data"));
    assert!(
        pages[4].headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert_eq!(pages[9].status, StatusCode::NOT_FOUND);
}

/// A POST without the session's CSRF token, or with a wrong one, answers 403 and
/// changes nothing: no replay, no purge, no sync, no logout, no audit row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_the_right_csrf_token_are_refused_and_change_nothing() {
    let fake = FakeClerk::start(CLERK_KEY).await;
    fake.put_organization(org("org_csrf").named("Csrf Inc").data_at(T0));
    let app = spawn_app_with(TestOptions::with_clerk(&fake)).await;
    let (id1, id2) = (msg_id(), msg_id());
    inject_dead(
        &app.settings,
        &[
            dead("organization.created", "org_csrf", &id1),
            dead("organization.updated", "org_csrf", &id2),
        ],
    )
    .await;
    let (console, csrf) = Console::signed_in(&app, "alice").await;
    let (_, other_csrf) = Console::signed_in(&app, "bob").await;
    assert_ne!(csrf, other_csrf, "one token per session");

    for token in [None, Some(""), Some("wrong"), Some(other_csrf.as_str())] {
        let with = |mut fields: Vec<(&'static str, String)>| {
            if let Some(t) = token {
                fields.push(("csrf", t.to_owned()));
            }
            fields
        };
        let posts = [
            (format!("/ops/dead-letters/{id1}/replay"), with(vec![])),
            (
                format!("/ops/dead-letters/{id1}/purge"),
                with(vec![("confirm", "yes".into())]),
            ),
            (
                "/ops/dead-letters/replay".to_owned(),
                with(vec![("confirm", "yes".into())]),
            ),
            ("/ops/workspaces/org_csrf/sync".to_owned(), with(vec![])),
            ("/ops/logout".to_owned(), with(vec![])),
        ];
        for (path, fields) in posts {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let page = console.post(&path, &fields).await;
            assert_eq!(page.status, StatusCode::FORBIDDEN, "{path} with {token:?}");
            assert!(page.body.contains("nothing was changed"), "{}", page.body);
            // The same POST with no form at all: still the 403, not a 415.
            if token.is_none() {
                let bare = console.http.post(format!("{}{path}", console.base));
                let page = console.send(bare).await;
                assert_eq!(page.status, StatusCode::FORBIDDEN, "{path} without a body");
                assert!(page.body.contains("nothing was changed"), "{}", page.body);
            }
        }
    }

    assert_eq!(dead_ids(&app).await, [id1, id2], "still dead, in order");
    assert!(audit_rows(&app).await.is_empty(), "no action, no sync");
    let workspaces: i64 = sqlx::query_scalar("select count(*) from workspaces")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(workspaces, 0, "the sync did not run");
    assert_eq!(
        console.get("/ops").await.status,
        StatusCode::OK,
        "still signed in"
    );
}

/// Purge and bulk replay show a confirm step (the count, a form with confirm=yes)
/// and do nothing until it is submitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_bulk_replay_confirm_before_acting() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..3).map(|_| msg_id()).collect();
    inject_dead(
        &app.settings,
        &[
            dead("organization.created", "org_a", &ids[0]),
            dead("organization.updated", "org_a", &ids[1]),
            dead("organization.created", "org_b", &ids[2]),
        ],
    )
    .await;
    let (console, csrf) = Console::signed_in(&app, "alice").await;

    let step = console
        .post(
            &format!("/ops/dead-letters/{}/purge", ids[0]),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(step.status, StatusCode::OK, "{}", step.body);
    assert!(step.body.contains("Purge this dead letter?"));
    assert!(step.body.contains(r#"name="confirm" value="yes""#));
    assert!(step.body.contains(&ids[0]));

    let step = console
        .post(
            "/ops/dead-letters/replay",
            &[("csrf", &csrf), ("type", "organization.created")],
        )
        .await;
    assert_eq!(step.status, StatusCode::OK, "{}", step.body);
    assert!(
        step.body.contains("Replay 2 dead letters?"),
        "{}",
        step.body
    );
    assert!(step.body.contains(r#"name="confirm" value="yes""#));
    assert!(
        step.body
            .contains(r#"name="type" value="organization.created""#)
    );
    assert!(step.body.contains(&ids[0]) && step.body.contains(&ids[2]));
    assert!(!step.body.contains(&ids[1]), "not selected");
    // A confirm value other than `yes` is no confirmation.
    let step = console
        .post(
            &format!("/ops/dead-letters/{}/purge", ids[1]),
            &[("csrf", &csrf), ("confirm", "true")],
        )
        .await;
    assert!(step.body.contains("Purge this dead letter?"));

    assert_eq!(dead_ids(&app).await, ids, "nothing replayed or purged");
    assert!(audit_rows(&app).await.is_empty());
}

/// Each action does what the CLI does, redirects (303) with a one-line result,
/// and writes its audit row: replays with actor `replay`, purge and sync with
/// actor `ops`, each with the operator's label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_action_acts_redirects_and_is_audited() {
    let fake = FakeClerk::start(CLERK_KEY).await;
    let acme = org("org_audit").named("Audit Inc").version(T0);
    fake.put_organization(acme.data_at(T0));
    fake.put_membership(
        acme.membership("orgmem_audit_ada", &person("user_audit_ada", "a"))
            .role("org:admin")
            .data_at(T0),
    );
    let app = spawn_app_with(TestOptions::with_clerk(&fake)).await;
    let ids: Vec<String> = (0..4).map(|_| msg_id()).collect();
    inject_dead(
        &app.settings,
        &[
            dead("organization.created", "org_audit", &ids[0]),
            dead("organization.updated", "org_audit", &ids[1]),
            dead("organization.updated", "org_audit", &ids[2]),
            dead("user.deleted", "-", &ids[3]),
        ],
    )
    .await;
    let (console, csrf) = Console::signed_in(&app, "alice").await;

    // Replay one: gone from the dead letters, in the work queue, back to the list.
    let page = console
        .post(
            &format!("/ops/dead-letters/{}/replay", ids[0]),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(page.location(), "/ops/dead-letters");
    let list = console.get("/ops/dead-letters").await;
    assert!(
        list.body.contains(&format!("Replayed {}", ids[0])),
        "{}",
        list.body
    );
    let again = console.get("/ops/dead-letters").await;
    assert!(!again.body.contains("Replayed"), "the result shows once");
    let work = drain_queue(&app.settings.broker.queue).await;
    assert_eq!(message_ids(&work), [ids[0].clone()]);
    // The copy names the operator, for the worker's audit rows of the event.
    let replayed_by = work[0]
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-replayed-by").cloned());
    assert_eq!(
        replayed_by,
        Some(lapin::types::AMQPValue::LongString("alice".into()))
    );

    // Bulk replay of a filtered set, confirmed from its confirm step (which carries
    // the ids it shows).
    let step = console
        .post(
            "/ops/dead-letters/replay",
            &[("csrf", &csrf), ("type", "organization.updated")],
        )
        .await;
    let shown = step.hidden("ids");
    let page = console
        .post(
            "/ops/dead-letters/replay",
            &[
                ("csrf", &csrf),
                ("type", "organization.updated"),
                ("ids", &shown),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(
        page.location(),
        "/ops/dead-letters?type=organization.updated"
    );
    let list = console.get(page.location()).await;
    assert!(list.body.contains("Replayed 2, failed 0"), "{}", list.body);

    // Purge one (a user event: no workspace), confirmed, from the list.
    let page = console
        .post(
            &format!("/ops/dead-letters/{}/purge", ids[3]),
            &[
                ("csrf", &csrf),
                ("confirm", "yes"),
                ("back", "/ops/dead-letters?class=payload"),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), "/ops/dead-letters?class=payload");
    assert!(dead_ids(&app).await.is_empty());

    // Sync from Clerk: provisions, shows the drift, back to the workspace.
    let page = console
        .post("/ops/workspaces/org_audit/sync", &[("csrf", &csrf)])
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), "/ops/workspaces/org_audit");
    let ws = console.get("/ops/workspaces/org_audit").await;
    assert_eq!(ws.status, StatusCode::OK, "{}", ws.body);
    assert!(
        ws.body.contains("Synced org_audit from Clerk"),
        "{}",
        ws.body
    );
    assert!(
        ws.body.contains("workspace_missing org_audit"),
        "the drift: {}",
        ws.body
    );
    assert!(
        ws.body.contains("member_missing org_audit user_audit_ada"),
        "{}",
        ws.body
    );
    assert!(ws.body.contains("Audit Inc") && ws.body.contains("user_audit_ada"));

    let rows = audit_rows(&app).await;
    let console_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.1.starts_with("dead_letter.") || r.1 == "workspace.synced")
        .collect();
    let summary: Vec<(Option<&str>, &str, &str, Option<&str>)> = console_rows
        .iter()
        .map(|(w, a, actor, e, _)| (w.as_deref(), a.as_str(), actor.as_str(), e.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                Some("org_audit"),
                "dead_letter.replayed",
                "replay",
                Some(ids[0].as_str())
            ),
            (
                Some("org_audit"),
                "dead_letter.replayed",
                "replay",
                Some(ids[1].as_str())
            ),
            (
                Some("org_audit"),
                "dead_letter.replayed",
                "replay",
                Some(ids[2].as_str())
            ),
            (None, "dead_letter.purged", "ops", Some(ids[3].as_str())),
            (Some("org_audit"), "workspace.synced", "ops", None),
        ]
    );
    for (_, action, _, _, details) in &console_rows {
        assert_eq!(details["operator"], "alice", "{action}: {details}");
    }
    assert_eq!(
        console_rows[1].4["selection"],
        "type = organization.updated"
    );
    assert!(
        console_rows[4].4["applied"].as_u64() >= Some(1),
        "{}",
        console_rows[4].4
    );
    // The sync's own changes keep actor `reconcile`.
    assert!(
        rows.iter()
            .any(|r| r.1 == "workspace.provisioned" && r.2 == "reconcile")
    );
}

/// A dead letter whose body and error carry markup renders them as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_dead_letter_renders_as_text() {
    let app = spawn_app().await;
    let id = msg_id();
    let hostile = r#"<script>alert("owned")</script>"#;
    let mut letter = Inject::event("organization.created", "org_x", &id).worker_headers(
        "payload",
        "bad <img src=x onerror=alert(1)>",
        1,
        1_716_883_201_500,
    );
    letter.body = envelope(
        "organization.created",
        json!({"id": "org_x\"><script>alert(2)</script>", "name": hostile}),
        T0,
    );
    inject_dead(&app.settings, &[letter]).await;
    let (console, _) = Console::signed_in(&app, "<b>eve</b>").await;

    for path in [
        "/ops/dead-letters".to_owned(),
        format!("/ops/dead-letters/{id}"),
    ] {
        let page = console.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
        for raw in ["<script>alert", "<img src=x", "<b>eve</b>"] {
            assert!(
                !page.body.contains(raw),
                "{path} renders {raw} raw: {}",
                page.body
            );
        }
        assert!(
            page.body.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{path}"
        );
        assert!(
            page.body.contains("&lt;b&gt;eve&lt;/b&gt;"),
            "{path}: the label too"
        );
    }
    let detail = console.get(&format!("/ops/dead-letters/{id}")).await;
    assert!(
        detail
            .body
            .contains("&lt;script&gt;alert(\\&quot;owned\\&quot;)&lt;/script&gt;"),
        "{}",
        detail.body
    );
    assert!(
        detail.body.contains("<details class=\"json\" open>"),
        "the body, collapsible"
    );
}

/// Logging out deletes the session: the old cookie opens nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_ends_the_session_for_good() {
    let app = spawn_app().await;
    let (console, csrf) = Console::signed_in(&app, "alice").await;
    let page = console.post("/ops/logout", &[("csrf", &csrf)]).await;
    page.assert_redirect_to_login("logout");
    assert!(
        page.headers[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let sessions: i64 = sqlx::query_scalar("select count(*) from ops_sessions")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(sessions, 0);
    // The browser would drop the cookie; an attacker who kept it gets nothing.
    console
        .get("/ops")
        .await
        .assert_redirect_to_login("old cookie");
    console
        .post("/ops/workspaces/org_a/sync", &[("csrf", &csrf)])
        .await
        .assert_redirect_to_login("old cookie and its csrf");
}

/// A session idle for 12 hours is over (and deleted); a younger one is bumped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_expires_after_twelve_hours() {
    let app = spawn_app().await;
    let (console, _) = Console::signed_in(&app, "alice").await;
    sqlx::query("update ops_sessions set last_seen_at = now() - interval '11 hours 59 minutes'")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(console.get("/ops/events").await.status, StatusCode::OK);
    let idle: f64 = sqlx::query_scalar(
        "select extract(epoch from now() - last_seen_at)::float8 from ops_sessions",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(idle < 60.0, "every request bumps last_seen_at ({idle} s)");

    sqlx::query("update ops_sessions set last_seen_at = now() - interval '12 hours 1 minute'")
        .execute(&app.db)
        .await
        .unwrap();
    console
        .get("/ops/events")
        .await
        .assert_redirect_to_login("expired");
    let sessions: i64 = sqlx::query_scalar("select count(*) from ops_sessions")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(sessions, 0, "the expired session is deleted");
    // Bumping the clock back does not revive it.
    console
        .get("/ops/events")
        .await
        .assert_redirect_to_login("still expired");
}

/// A read-API token does not open the console, and the console's token or cookie
/// does not open the read API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_and_read_api_credentials_are_kept_apart() {
    let app = spawn_app().await;
    let anonymous = Console::new(&app);
    // The API token as a bearer on /ops, and as the login token.
    let page = anonymous
        .send(
            anonymous
                .http
                .get(format!("{}/ops", app.address))
                .bearer_auth(TOKEN),
        )
        .await;
    page.assert_redirect_to_login("API bearer on /ops");
    let mut console = Console::new(&app);
    assert_eq!(
        console.login(TOKEN, "").await.status,
        StatusCode::UNAUTHORIZED
    );

    // The ops token as a bearer on /v1, and the session cookie on /v1.
    let (console, _) = {
        let page = console.login(OPS_TOKEN, "").await;
        assert_eq!(page.status, StatusCode::SEE_OTHER);
        let csrf = console.get("/ops/events").await.csrf();
        (console, csrf)
    };
    let r = app
        .client
        .get(format!("{}/v1/workspaces/org_a", app.address))
        .bearer_auth(OPS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "ops token on /v1");
    let page = console.get("/v1/workspaces/org_a").await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED, "ops cookie on /v1");
    // And the API token still works there, the cookie still here.
    assert_eq!(
        app.get_api("/v1/workspaces/org_a").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(console.get("/ops").await.status, StatusCode::OK);
}

/// The list shows every column, filters by type, workspace and class, pages, and
/// says what to do when empty; a dead letter's page shows it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_filtered_paged_and_shown_whole() {
    let app = spawn_app().await;
    let (console, _) = Console::signed_in(&app, "alice").await;
    let empty = console.get("/ops/dead-letters").await;
    assert!(empty.body.contains("No dead letters."), "{}", empty.body);

    let ids: Vec<String> = (0..3).map(|_| msg_id()).collect();
    inject_dead(
        &app.settings,
        &[
            dead("organization.created", "org_a", &ids[0]),
            Inject::event("organization.updated", "org_b", &ids[1]).worker_headers(
                "retries-exhausted",
                "database error: pool timed out",
                4,
                1_716_883_202_000,
            ),
            dead("organizationMembership.created", "org_a", &ids[2]),
        ],
    )
    .await;
    let all = console.get("/ops/dead-letters").await;
    for needle in [
        ids[0].as_str(),
        "organization.created",
        r#"href="/ops/workspaces/org_a""#,
        "retries-exhausted",
        "database error: pool timed out",
        "2024-05-28 08:00:01 UTC",
        "Replay all 3…",
    ] {
        assert!(all.body.contains(needle), "{needle}: {}", all.body);
    }
    let shows = |page: &Page, expected: &[&String]| {
        for id in &ids {
            assert_eq!(
                page.body.contains(id.as_str()),
                expected.contains(&id),
                "{id}: {}",
                page.body
            );
        }
    };
    shows(
        &console.get("/ops/dead-letters?org=org_a").await,
        &[&ids[0], &ids[2]],
    );
    shows(
        &console
            .get("/ops/dead-letters?type=organization.updated")
            .await,
        &[&ids[1]],
    );
    shows(
        &console
            .get("/ops/dead-letters?class=payload&org=org_a&type=organization.created")
            .await,
        &[&ids[0]],
    );
    shows(
        &console.get("/ops/dead-letters?limit=2").await,
        &[&ids[0], &ids[1]],
    );
    let second = console.get("/ops/dead-letters?limit=2&page=2").await;
    shows(&second, &[&ids[2]]);
    assert!(second.body.contains("page 2 of 2"));
    let none = console.get("/ops/dead-letters?org=org_zzz").await;
    assert!(none.body.contains("No dead letter matches these filters."));
    assert_eq!(
        console.get("/ops/dead-letters?limit=0").await.status,
        StatusCode::BAD_REQUEST
    );

    let detail = console.get(&format!("/ops/dead-letters/{}", ids[1])).await;
    for needle in [
        "Why it died",
        "database error: pool timed out",
        "x-error-class",
        "message_id",
        "&quot;org_b&quot;",
    ] {
        assert!(detail.body.contains(needle), "{needle}: {}", detail.body);
    }
    let missing = console.get("/ops/dead-letters/msg_none").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body.contains("/ops/events?id=msg_none"));
    assert_eq!(dead_ids(&app).await, ids, "looking changed nothing");
}

/// The events page searches the processing log; `?id=` shows that id alone, and
/// a dead event links to its dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_page_searches_the_processing_log() {
    let app = spawn_app().await;
    let (console, _) = Console::signed_in(&app, "alice").await;
    assert!(
        console
            .get("/ops/events")
            .await
            .body
            .contains("The processing log is empty.")
    );
    for (id, kind, org, status) in [
        ("msg_e1", "organization.created", "org_a", "processed"),
        ("msg_e2", "organization.updated", "org_a", "dead"),
        ("msg_e3", "organization.created", "org_b", "superseded"),
    ] {
        sqlx::query(
            "insert into events (svix_id, type, workspace_id, status, error, received_at) \
             values ($1, $2, $3, $4, case when $4 = 'dead' then 'broken <payload>' end, now())",
        )
        .bind(id)
        .bind(kind)
        .bind(org)
        .bind(status)
        .execute(&app.db)
        .await
        .unwrap();
    }
    let shows = |page: &Page, expected: &[&str]| {
        for id in ["msg_e1", "msg_e2", "msg_e3"] {
            assert_eq!(
                page.body.contains(id),
                expected.contains(&id),
                "{id}: {}",
                page.body
            );
        }
    };
    shows(
        &console.get("/ops/events").await,
        &["msg_e1", "msg_e2", "msg_e3"],
    );
    shows(&console.get("/ops/events?id=msg_e3").await, &["msg_e3"]);
    shows(
        &console.get("/ops/events?org=org_a").await,
        &["msg_e1", "msg_e2"],
    );
    shows(
        &console.get("/ops/events?type=organization.created").await,
        &["msg_e1", "msg_e3"],
    );
    let dead = console.get("/ops/events?status=dead").await;
    shows(&dead, &["msg_e2"]);
    assert!(dead.body.contains(r#"href="/ops/dead-letters/msg_e2""#));
    assert!(dead.body.contains("broken &lt;payload&gt;"));
    let unknown = console.get("/ops/events?id=msg_nope").await;
    assert!(unknown.body.contains("No worker has seen this svix id."));
}

/// A workspace page shows its state, members, audit trail and events; one never
/// provisioned answers 404 with the sync button.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_page_shows_state_members_audit_and_events() {
    let app = spawn_app().await;
    let (console, _) = Console::signed_in(&app, "alice").await;
    let acme = org("org_page").named("Page & Co").version(T0);
    let events = [
        acme.created(T0).svix("msg_page_1"),
        acme.membership("orgmem_page_1", &person("user_page_1", "x"))
            .role("org:admin")
            .created(T0 + 1)
            .svix("msg_page_2"),
    ];
    let provisioner = provisioner::provision::Provisioner::new(app.settings.provisioning.clone());
    let incoming: Vec<_> = events.into_iter().map(|e| e.incoming()).collect();
    for result in provisioner.apply_batch(&app.db, &incoming).await {
        result.unwrap();
    }
    let page = console.get("/ops/workspaces/org_page").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    for needle in [
        "Page &amp; Co",
        "seats",
        "starter_analysis",
        "user_page_1",
        "org:admin",
        "workspace.provisioned",
        "member.added",
        "msg_page_2",
        "Sync from Clerk is off",
    ] {
        assert!(page.body.contains(needle), "{needle}: {}", page.body);
    }
    let none = console.get("/ops/workspaces/org_never").await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert!(none.body.contains("not provisioned here"));
}

/// The overview reports the dead letters, queue depths and dependencies it measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_reports_what_it_measured() {
    // A process of its own: the overview reads the process's metrics, and other
    // tests of this binary run workers in theirs.
    let iso = Isolation::new();
    let settings = test_settings(&iso, &TestOptions::default());
    let served = Served::start_with(&iso, &["serve", "--no-worker"]).await;
    inject_dead(
        &settings,
        &[
            dead("organization.created", "org_a", &msg_id()),
            dead("organization.created", "org_a", &msg_id()),
        ],
    )
    .await;
    let mut console = Console::at(&served.base);
    let login = console.login(OPS_TOKEN, "alice").await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    let page = console.get("/ops").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    for needle in [
        "measuring now",
        settings.broker.dead_letter_queue.as_str(),
        settings.broker.queue.as_str(),
        "PostgreSQL",
        "answers",
        "connected",
        "no worker runs in this process",
    ] {
        assert!(page.body.contains(needle), "{needle}: {}", page.body);
    }
    assert!(
        page.body.contains(r#"<p class="big bad">2</p>"#),
        "{}",
        page.body
    );
}

// ---- dead letters: bounded, detached, non-destructive views (issue 19) -------------

/// The ids a confirm step's form carries.
fn carried_ids(step: &Page) -> Vec<String> {
    serde_json::from_str(&step.hidden("ids")).expect("a JSON array of ids")
}

/// A confirmed bulk replay replays exactly the letters its confirm step showed: a
/// matching letter that arrived after the step stays dead, and a shown one that
/// left meanwhile is reported, not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_replay_replays_exactly_what_its_confirm_step_showed() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..4).map(|_| msg_id()).collect();
    inject_dead(
        &app.settings,
        &[
            dead("organization.updated", "org_a", &ids[0]),
            dead("organization.created", "org_a", &ids[1]),
            dead("organization.updated", "org_b", &ids[2]),
            dead("organization.updated", "org_c", &ids[3]),
        ],
    )
    .await;
    let (console, csrf) = Console::signed_in(&app, "alice").await;
    let step = console
        .post(
            "/ops/dead-letters/replay",
            &[("csrf", &csrf), ("type", "organization.updated")],
        )
        .await;
    assert!(
        step.body.contains("Replay 3 dead letters?"),
        "{}",
        step.body
    );
    let shown = vec![ids[0].clone(), ids[2].clone(), ids[3].clone()];
    assert_eq!(carried_ids(&step), shown, "the step carries what it lists");
    for id in &shown {
        assert!(step.body.contains(id.as_str()), "{id} listed");
    }

    // Meanwhile one more matching letter arrives and one shown is purged elsewhere.
    let late = msg_id();
    inject_dead(
        &app.settings,
        &[dead("organization.updated", "org_d", &late)],
    )
    .await;
    provisioner::dead_letters::purge(&app.settings, &Selection::Ids(vec![ids[3].clone()]))
        .await
        .unwrap();
    let page = console
        .post(
            "/ops/dead-letters/replay",
            &[
                ("csrf", &csrf),
                ("type", "organization.updated"),
                ("ids", &step.hidden("ids")),
                ("confirm", "yes"),
            ],
        )
        .await;

    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let mut work = message_ids(&drain_queue(&app.settings.broker.queue).await);
    work.sort();
    let mut expected = vec![ids[0].clone(), ids[2].clone()];
    expected.sort();
    assert_eq!(work, expected, "exactly the shown letters still there");
    assert_eq!(dead_ids(&app).await, [ids[1].clone(), late.clone()]);
    let list = console.get(page.location()).await;
    assert!(list.body.contains("Replayed 2, failed 0"), "{}", list.body);
    assert!(
        list.body
            .contains(&format!("{} was no longer in the queue", ids[3])),
        "{}",
        list.body
    );
}

/// Console views whose clients go away mid-read leave the queue exactly as it was:
/// the same letters, each once, with their headers, exchange and routing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_console_views_leave_the_dead_letters_as_they_were() {
    let app = spawn_app().await;
    let msgs = many_letters(&format!("msg_{}", random_id(6)), 120, 100_000);
    inject_dead_routed(&app.settings, &msgs).await;
    let (console, _) = Console::signed_in(&app, "alice").await;

    // A filtered page looks at every letter; each client leaves at another point
    // of the read (and, before this release, of putting copies back).
    for after_ms in [100, 300, 600, 900, 1300, 1800, 2500] {
        console
            .abandon(
                "/ops/dead-letters?class=payload",
                None,
                Duration::from_millis(after_ms),
            )
            .await;
    }
    // A view that stays waits its turn after every session begun before it.
    let full = console.get("/ops/dead-letters?limit=500").await;

    assert_eq!(full.status, StatusCode::OK);
    let count = full
        .body
        .split(r#"<span class="count">"#)
        .nth(1)
        .and_then(|rest| rest.split('<').next());
    assert_eq!(count, Some("120"), "letters in the queue after the views");
    let left = drain_queue(&app.settings.broker.dead_letter_queue).await;
    assert_intact(&left, &msgs, &app.settings.broker.dead_letter_exchange);
}

/// A page of the console reads the queue only down to its own rows: the letters
/// after it are not even delivered, and the page still counts them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_page_reads_the_queue_only_down_to_itself() {
    let app = spawn_app().await;
    let msgs = many_letters(&format!("msg_{}", random_id(6)), 60, 0);
    inject_dead_routed(&app.settings, &msgs).await;
    let (console, _) = Console::signed_in(&app, "alice").await;

    let page = console.get("/ops/dead-letters?limit=20&page=2").await;

    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("60 in the queue") && page.body.contains("page 2 of 3"));
    for (i, m) in msgs.iter().enumerate() {
        let id = m.message_id.as_deref().unwrap();
        assert_eq!(page.body.contains(id), (20..40).contains(&i), "{id}");
    }
    let left = drain_queue(&app.settings.broker.dead_letter_queue).await;
    assert_intact(&left, &msgs, &app.settings.broker.dead_letter_exchange);
    // RabbitMQ 3.10 counts every delivery (0 on the first): the drain's own
    // delivery shows 1 for a letter the page read and gave back, 0 for the rest.
    for (i, m) in left.iter().enumerate() {
        let count = header(m, "x-delivery-count").and_then(provisioner::broker::headers::int_value);
        let expected = if i < 40 { Some(1) } else { Some(0) };
        assert_eq!(count, expected, "letter {i}");
    }
}

/// Views asked for and abandoned while the queue is busy do not pile up sessions:
/// the first one's session runs when the queue frees, the others never start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_views_do_not_pile_up_sessions() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..3).map(|_| msg_id()).collect();
    let msgs: Vec<Inject> = ids
        .iter()
        .map(|id| dead("organization.created", "org_a", id))
        .collect();
    inject_dead(&app.settings, &msgs).await;
    let (console, _) = Console::signed_in(&app, "alice").await;

    // Another session (a `dlq` command) holds the queue while five views come and go.
    let holder = DeadQueue::open(&app.settings, Duration::from_secs(10))
        .await
        .unwrap();
    for _ in 0..5 {
        console
            .abandon("/ops/dead-letters", None, Duration::from_millis(400))
            .await;
    }
    holder.close().await.unwrap();
    // This view waits for the sessions begun before it, and reads every letter too.
    let page = console.get("/ops/dead-letters").await;

    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let left = drain_queue(&app.settings.broker.dead_letter_queue).await;
    assert_eq!(message_ids(&left), ids);
    for m in &left {
        // Each session that read a letter counted one delivery: two sessions, the
        // first abandoned view's and the last view's.
        let count = header(m, "x-delivery-count").and_then(provisioner::broker::headers::int_value);
        assert_eq!(count, Some(2), "sessions that read it");
    }
}

/// A replay whose client left while it waited for the queue is still carried out
/// when the queue frees: replayed once, removed from the dead letters, audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_client_left_is_still_carried_out_and_audited() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..2).map(|_| msg_id()).collect();
    inject_dead(
        &app.settings,
        &[
            dead("organization.created", "org_gone", &ids[0]),
            dead("organization.created", "org_gone", &ids[1]),
        ],
    )
    .await;
    let (console, csrf) = Console::signed_in(&app, "alice").await;

    let holder = DeadQueue::open(&app.settings, Duration::from_secs(10))
        .await
        .unwrap();
    console
        .abandon(
            &format!("/ops/dead-letters/{}/replay", ids[0]),
            Some(&[("csrf", &csrf)]),
            Duration::from_millis(700),
        )
        .await;
    holder.close().await.unwrap();

    let done = eventually(Duration::from_secs(30), || async {
        let rows = audit_rows(&app).await;
        rows.iter()
            .any(|r| r.1 == "dead_letter.replayed" && r.3.as_deref() == Some(ids[0].as_str()))
            .then_some(())
    })
    .await;
    assert!(done.is_some(), "the replay was audited");
    assert_eq!(
        message_ids(&drain_queue(&app.settings.broker.queue).await),
        [ids[0].clone()]
    );
    assert_eq!(dead_ids(&app).await, [ids[1].clone()]);
}

/// Listing 200 dead letters of 500 KB through the console keeps `serve`'s peak
/// resident memory under its idle resident memory + 32 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_large_dead_letters_keeps_serve_memory_bounded() {
    let iso = Isolation::new();
    let settings = test_settings(&iso, &TestOptions::default());
    let served = Served::start(&iso).await;
    let pid = served.process.pid();
    let mut console = Console::at(&served.base);
    let login = console.login(OPS_TOKEN, "alice").await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    // Warm the page's code path on an empty queue, then fill it.
    assert_eq!(
        console.get("/ops/dead-letters").await.status,
        StatusCode::OK
    );
    let msgs = many_letters(&format!("msg_{}", random_id(6)), 200, 500_000);
    inject_dead(&settings, &msgs).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle, _) = resident(pid);
    reset_peak(pid);

    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = tokio::spawn({
        let sampling = sampling.clone();
        async move {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(resident(pid).0);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        }
    });
    // Page 2 reads all 200; a filter looks at every letter; a show keeps one body.
    let second = console.get("/ops/dead-letters?page=2").await;
    let filtered = console.get("/ops/dead-letters?class=payload").await;
    let last = msgs[199].message_id.clone().unwrap();
    let shown = console.get(&format!("/ops/dead-letters/{last}")).await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let sampled = sampler.await.unwrap();
    let (_, high_water) = resident(pid);

    for page in [&second, &filtered, &shown] {
        assert_eq!(
            page.status,
            StatusCode::OK,
            "{}",
            &page.body[..page.body.len().min(2000)]
        );
    }
    assert!(second.body.contains(&last), "page 2 shows the last letter");
    let peak = sampled.max(high_water);
    let mb = |b: u64| b as f64 / 1_048_576.0;
    assert!(
        peak < idle + 32 * 1_048_576,
        "peak {:.1} MB against idle {:.1} MB",
        mb(peak),
        mb(idle)
    );
    let left = drain_queue(&settings.broker.dead_letter_queue).await;
    assert_eq!(left.len(), 200, "every letter still there");
}
