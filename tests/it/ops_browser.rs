//! The ops console in a real browser (issue 13): headless Chromium driven through
//! chromedriver, against the real intake, worker, PostgreSQL and RabbitMQ, and the
//! fake Clerk API. It saves a screenshot of each page under
//! `target/ops-screenshots/` for a person to look at.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when
//! missing); without chromedriver the test fails saying so, unless
//! `PROVISIONER_SKIP_BROWSER=1`, when it prints that it skipped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::children::free_port;
use crate::common::story::{org, person};
use crate::common::worker::wait_status;
use crate::common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use provisioner::clerk::fake::FakeClerk;
use serde_json::json;

const OPS_TOKEN: &str = provisioner::config::DEVELOPMENT_OPS_TOKEN;
const CLERK_KEY: &str = "sk_test_ops_browser_fake_key_0123";
const T0: i64 = 1_750_000_000_000;
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const WIDTH: u32 = 1360;

/// chromedriver on a free port, killed when dropped, with a profile of its own.
struct Driver {
    child: tokio::process::Child,
    url: String,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Driver {
    async fn start() -> Self {
        let port = free_port();
        let child = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        let ready = eventually(Duration::from_secs(20), || async {
            reqwest::get(&status)
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await;
        assert!(ready.is_some(), "chromedriver did not answer on {url}");
        let profile = std::env::temp_dir().join(format!("provisioner-chromium-{}", random_id(10)));
        Self {
            child,
            url,
            profile,
        }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--window-size={WIDTH},900"),
                    format!("--user-data-dir={}", self.profile.display()),
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

/// Saves a full-page screenshot as `target/ops-screenshots/NAME.png`.
async fn shot(browser: &Client, name: &str) {
    let height = browser
        .execute("return document.documentElement.scrollHeight;", vec![])
        .await
        .ok()
        .and_then(|v| v.as_u64())
        .unwrap_or(900)
        .clamp(600, 4000) as u32;
    let _ = browser.set_window_size(WIDTH, height + 90).await;
    let png = browser.screenshot().await.expect("screenshot");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ops-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// The text of the page as it is now (retried while a navigation replaces it).
async fn text(browser: &Client) -> String {
    let read = eventually(Duration::from_secs(10), || async {
        wait_loaded(browser).await;
        browser
            .find(Locator::Css("body"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    })
    .await;
    read.expect("the page has a body")
}

/// Waits until the document has loaded.
async fn wait_loaded(browser: &Client) {
    let _ = eventually(Duration::from_secs(10), || async {
        let state = browser
            .execute("return document.readyState;", vec![])
            .await
            .ok()?;
        (state == "complete").then_some(())
    })
    .await;
}

/// Clicks what `css` finds, then waits until the page it leads to has replaced
/// this one (every click here submits a form or follows a link).
async fn click(browser: &Client, css: &str) {
    let old = browser.find(Locator::Css("html")).await.unwrap();
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap();
    // The old document's element goes stale once the new page replaced it.
    let replaced = eventually(Duration::from_secs(20), || async {
        old.tag_name().await.is_err().then_some(())
    })
    .await;
    assert!(replaced.is_some(), "clicking {css} led nowhere");
    wait_loaded(browser).await;
}

/// The page's text once it contains `needle`, reloading `path` until it does.
async fn until_shown(browser: &Client, base: &str, path: &str, needle: &str) -> String {
    let found = eventually(Duration::from_secs(40), || async {
        browser.goto(&format!("{base}{path}")).await.ok()?;
        let t = text(browser).await;
        t.contains(needle).then_some(t)
    })
    .await;
    found.unwrap_or_else(|| panic!("{path} never showed {needle}"))
}

/// Log in, find the dead letter a malformed signed webhook made, open it, replay it
/// (it dies again, visibly), purge it through the confirm step, open its workspace
/// and sync it from the fake Clerk API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_handles_a_dead_letter_and_syncs_a_workspace_in_chromium() {
    if !Path::new(CHROMEDRIVER).exists() {
        if std::env::var("PROVISIONER_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("skipped: {CHROMEDRIVER} is missing and PROVISIONER_SKIP_BROWSER=1");
            return;
        }
        panic!(
            "{CHROMEDRIVER} is missing: install Debian's chromium and chromium-driver \
             (apt-get install chromium chromium-driver; .ci/run does it), or set \
             PROVISIONER_SKIP_BROWSER=1 to skip this test"
        );
    }
    // Arrange: Clerk has the organization; a signed membership event for it lacks
    // `public_user_data`, so the worker dead-letters it.
    let fake = FakeClerk::start(CLERK_KEY).await;
    let acme = org("org_browser").named("Browser & Sons").version(T0);
    fake.put_organization(acme.data_at(T0));
    for (n, (user, role)) in [("user_ada", "org:admin"), ("user_bob", "org:member")]
        .into_iter()
        .enumerate()
    {
        fake.put_membership(
            acme.membership(&format!("orgmem_browser_{n}"), &person(user, "b"))
                .role(role)
                .data_at(T0),
        );
    }
    let app = spawn_app_with(TestOptions {
        worker: true,
        ..TestOptions::with_clerk(&fake)
    })
    .await;
    let id = format!("msg_browser_{}", random_id(12));
    let mut data = fixture("organizationMembership.created")["data"].clone();
    data["organization"]["id"] = json!("org_browser");
    data.as_object_mut().unwrap().remove("public_user_data");
    let body = envelope("organizationMembership.created", data, now_secs() * 1000);
    let r = app.post_signed(&id, &body).await;
    assert_eq!(r.status(), 200, "intake queued it");
    assert!(
        wait_status(&app.db, &id, "dead").await,
        "the worker dead-lettered it"
    );

    let driver = Driver::start().await;
    let browser = driver.browser().await;
    let base = app.address.clone();

    // Log in.
    browser.goto(&format!("{base}/ops")).await.unwrap();
    assert!(
        browser
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/ops/login")
    );
    shot(&browser, "01-login").await;
    browser
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(OPS_TOKEN)
        .await
        .unwrap();
    browser
        .find(Locator::Css("#label"))
        .await
        .unwrap()
        .send_keys("alice")
        .await
        .unwrap();
    click(&browser, "form[action='/ops/login'] button").await;
    let overview = until_shown(&browser, &base, "/ops", "Overview").await;
    assert!(overview.contains("signed in as alice"), "{overview}");
    shot(&browser, "02-overview").await;

    // Find the dead letter and open it.
    let list = until_shown(&browser, &base, "/ops/dead-letters", &id).await;
    assert!(
        list.contains("public_user_data"),
        "the reason is listed: {list}"
    );
    shot(&browser, "03-dead-letters").await;
    click(&browser, &format!("a[href='/ops/dead-letters/{id}']")).await;
    let detail = text(&browser).await;
    assert!(
        detail.contains("Why it died") && detail.contains("organizationMembership.created"),
        "{detail}"
    );
    shot(&browser, "04-dead-letter").await;

    // Replay it without fixing anything: it dies again, and the list shows it.
    click(&browser, ".actions-bar form[action$='/replay'] button").await;
    let after = text(&browser).await;
    assert!(after.contains(&format!("Replayed {id}")), "{after}");
    shot(&browser, "05-replayed").await;
    let attempts = eventually(Duration::from_secs(40), || async {
        let n: Option<i32> = sqlx::query_scalar(
            "select attempts from events where svix_id = $1 and status = 'dead'",
        )
        .bind(&id)
        .fetch_optional(&app.db)
        .await
        .ok()
        .flatten();
        n.filter(|n| *n >= 2)
    })
    .await;
    assert!(
        attempts.is_some(),
        "the replay was processed and dead-lettered again"
    );
    until_shown(&browser, &base, "/ops/dead-letters", &id).await;
    let events = until_shown(&browser, &base, &format!("/ops/events?id={id}"), "dead").await;
    assert!(events.contains("dead letter →"), "{events}");
    shot(&browser, "06-events").await;

    // Purge it, through the confirm step.
    browser
        .goto(&format!("{base}/ops/dead-letters/{id}"))
        .await
        .unwrap();
    click(&browser, ".actions-bar form[action$='/purge'] button").await;
    let confirm = text(&browser).await;
    assert!(confirm.contains("Purge this dead letter?"), "{confirm}");
    shot(&browser, "07-confirm-purge").await;
    click(&browser, "form[action$='/purge'] button.danger").await;
    let purged = text(&browser).await;
    assert!(purged.contains(&format!("Purged {id}")), "{purged}");
    assert!(purged.contains("No dead letters."), "{purged}");
    shot(&browser, "08-purged").await;

    // Open the workspace (not provisioned: the membership never applied) and sync.
    browser
        .goto(&format!("{base}/ops/workspaces/org_browser"))
        .await
        .unwrap();
    assert!(text(&browser).await.contains("not provisioned here"));
    click(&browser, "form[action$='/sync'] button").await;
    let synced = text(&browser).await;
    assert!(synced.contains("Synced org_browser from Clerk"), "{synced}");
    assert!(
        synced.contains("member_missing org_browser user_ada"),
        "the drift: {synced}"
    );
    assert!(
        synced.contains("Browser & Sons") && synced.contains("user_bob"),
        "{synced}"
    );
    shot(&browser, "09-workspace-synced").await;

    browser.close().await.unwrap();
    let actors: Vec<(String, String)> =
        sqlx::query_as("select action, actor from audit_log where action like 'dead_letter.%' or action = 'workspace.synced' order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let actors: Vec<(&str, &str)> = actors
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        actors,
        [
            ("dead_letter.replayed", "replay"),
            ("dead_letter.purged", "ops"),
            ("workspace.synced", "ops")
        ]
    );
}
