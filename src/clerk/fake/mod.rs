//! A fake of Clerk's Backend API, for tests and load tools: `serve` never starts
//! it, and nothing in the service depends on it. Clerk is the one thing the
//! tests may fake (it is outside our control and unreachable here).
//!
//! Guarantee: it serves the documented shapes of
//! `../shared/reference/clerk-backend-api.md`: `{"data", "total_count"}` pages
//! with `limit` (1–500, default 10), `offset` and `order_by` (`±created_at`,
//! newest first by default), `404 resource_not_found` for a missing organization,
//! `401` for a wrong key, and the `ClerkErrors` body on every error; the list
//! filters reconcile relies on (repeatable `user_id` on an organization's
//! memberships, repeatable `organization_id` on the organizations), and
//! `GET /v1/instance`. Lists are kept in order, so a page costs its own size plus
//! a count, and tens of thousands of organizations serve a benchmark
//! ([`FakeClerk::populate`], `provisioner-load fake-clerk`).
//!
//! Tests script faults ([`FakeClerk::fail_next`], 429 with `Retry-After`, 5xx;
//! [`FakeClerk::set_latency`], slow answers; [`FakeClerk::clear_faults`] ends them),
//! read what was asked ([`FakeClerk::requests`]), can stop a request halfway
//! ([`FakeClerk::gate`]) and can change the world between two page fetches
//! ([`FakeClerk::before_page`]), as Clerk's lists shift while they are paged by
//! offset.

mod routes;
mod world;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use world::Change;

use crate::clerk::sample::{Person, membership, organization};

/// The instance id the fake's key belongs to unless a test says otherwise.
pub const INSTANCE_ID: &str = "ins_fake_clerk";

/// A scripted answer served instead of the next real one.
#[derive(Debug, Clone)]
pub struct Scripted {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` seconds, if any.
    pub retry_after: Option<u64>,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path, e.g. `/v1/organizations`.
    pub path: String,
    /// The list parameters as parsed (`limit=Some(..)&offset=..&order_by=..`,
    /// then each `user_id=` / `organization_id=`); empty for a single resource.
    pub query: String,
    /// `Clerk-API-Version` header.
    pub version: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// A request held until released ([`FakeClerk::gate`]).
#[derive(Debug)]
struct Gate {
    path: String,
    reached: Option<oneshot::Sender<()>>,
    release: Option<oneshot::Receiver<()>>,
}

/// A [`Change`] made when a list request of `path` at `offset` arrives, before it
/// is answered.
#[derive(Debug)]
struct PageHook {
    path: String,
    offset: i64,
    change: Option<Change>,
}

/// Everything the fake holds: Clerk's world and the test's script.
#[derive(Debug, Default)]
struct State {
    world: world::World,
    script: VecDeque<Scripted>,
    seen: Vec<Seen>,
    gates: Vec<Gate>,
    hidden: Vec<String>,
    unfindable: Vec<String>,
    hooks: Vec<PageHook>,
    /// `GET /v1/instance`'s id; `None` answers 404 (an API without it).
    instance: Option<String>,
    /// How long every answer waits before it is served ([`FakeClerk::set_latency`]).
    latency: std::time::Duration,
}

/// What the routes share.
#[derive(Debug, Clone)]
struct Shared {
    /// `Bearer <key>`: the one `Authorization` accepted.
    bearer: String,
    state: Arc<Mutex<State>>,
}

/// The running fake; clones share it, and it stops when the last one is dropped.
#[derive(Debug, Clone)]
pub struct FakeClerk {
    /// Base URL to give as `CLERK_API_URL`.
    pub url: String,
    /// The secret key it accepts.
    pub key: String,
    state: Arc<Mutex<State>>,
    _stop: Arc<StopOnDrop>,
}

#[derive(Debug)]
struct StopOnDrop(Option<mpsc::Sender<()>>, tokio::task::AbortHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.take();
        self.1.abort();
    }
}

impl FakeClerk {
    /// Starts a fake on a free local port that accepts `key`.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start(key: &str) -> Self {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Self::bind(any, key).await.expect("bind a local port")
    }

    /// Starts a fake on `addr` that accepts `key`, serving on the current
    /// runtime until the last clone is dropped.
    pub async fn bind(addr: SocketAddr, key: &str) -> std::io::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            instance: Some(INSTANCE_ID.to_owned()),
            ..State::default()
        }));
        let app = routes::router(Shared {
            bearer: format!("Bearer {key}"),
            state: state.clone(),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let task = tokio::spawn(async move {
            let stopped = async move {
                rx.recv().await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(error = %e, "fake Clerk stopped serving");
            }
        });
        Ok(Self {
            url,
            key: key.to_owned(),
            state,
            _stop: Arc::new(StopOnDrop(Some(tx), task.abort_handle())),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds or replaces an organization (by id).
    pub fn put_organization(&self, organization: Value) {
        self.state().world.put_organization(organization);
    }

    /// Deletes an organization and its memberships, as Clerk does.
    pub fn delete_organization(&self, id: &str) {
        self.state().world.delete_organization(id);
    }

    /// Adds or replaces a membership (by id).
    pub fn put_membership(&self, membership: Value) {
        self.state().world.put_membership(membership);
    }

    /// Removes a membership.
    pub fn delete_membership(&self, id: &str) {
        self.state().world.delete_membership(id);
    }

    /// Adds `orgs` organizations (`org_load0000000`, …, created a millisecond
    /// apart) with `members` memberships each, the first an admin: the world of
    /// the reconcile backfill benchmark.
    pub fn populate(&self, orgs: usize, members: usize) {
        let t0 = 1_700_000_000_000i64;
        let mut state = self.state();
        for i in 0..orgs {
            let id = format!("org_load{i:07}");
            let at = t0 + i as i64;
            let name = format!("Load Org {i}");
            let org = organization(&id, &name, "user_load_creator", at, at, members as u32);
            for j in 0..members {
                let person = Person::of(&format!("user_load{i:07}_{j}"));
                let role = if j == 0 { "org:admin" } else { "org:member" };
                let since = at + 1 + j as i64;
                let id = format!("orgmem_load{i:07}_{j}");
                let m = membership(&id, org.clone(), &person, role, since, since);
                state.world.put_membership(m);
            }
            state.world.put_organization(org);
        }
    }

    /// How many organizations and memberships the fake holds.
    pub fn size(&self) -> (usize, usize) {
        let state = self.state();
        (
            state.world.organizations.len(),
            state.world.memberships.len(),
        )
    }

    /// Leaves an organization out of the list (as a scan by offset can miss an
    /// item), while `GET /v1/organizations/{id}` still finds it.
    pub fn hide_from_list(&self, id: &str) {
        self.state().hidden.push(id.to_owned());
    }

    /// `GET /v1/organizations/{id}` answers 404 for it, while the list still
    /// shows it (a GET that cannot find what exists).
    pub fn unfindable_by_id(&self, id: &str) {
        self.state().unfindable.push(id.to_owned());
    }

    /// Makes `change` when the first list request of `path` (e.g.
    /// `/v1/organizations`) at `offset` arrives, before answering it: the world
    /// shifts between two page fetches.
    pub fn before_page(&self, path: &str, offset: i64, change: Change) {
        self.state().hooks.push(PageHook {
            path: path.to_owned(),
            offset,
            change: Some(change),
        });
    }

    /// The instance the key belongs to (`GET /v1/instance`); `None` makes that
    /// route answer 404, as an API without it would.
    pub fn set_instance(&self, id: Option<&str>) {
        self.state().instance = id.map(str::to_owned);
    }

    /// The next requests get these answers, in order, before real ones again.
    pub fn fail_next(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.state().script.extend(answers);
    }

    /// Every answer waits `latency` before it is served (a slow Clerk); zero
    /// serves at once again.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.state().latency = latency;
    }

    /// Ends the faults made so far: scripted answers not yet served, slowness,
    /// organizations hidden from the list or unfindable by id. The world, the
    /// gates and the page hooks stay.
    pub fn clear_faults(&self) {
        let mut state = self.state();
        state.script.clear();
        state.latency = std::time::Duration::ZERO;
        state.hidden.clear();
        state.unfindable.clear();
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    /// Holds the first request whose path is `path` until the returned sender is
    /// used (or dropped); the receiver fires when that request arrives.
    pub fn gate(&self, path: &str) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.state().gates.push(Gate {
            path: path.to_owned(),
            reached: Some(reached_tx),
            release: Some(release_rx),
        });
        (reached_rx, release_tx)
    }
}
