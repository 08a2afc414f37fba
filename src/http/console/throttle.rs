//! The sign-in throttle of `/ops/login`: failed sign-ins counted per client
//! address and overall, over a sliding minute.
//!
//! Guarantee: in any [`WINDOW`], at most [`PER_CLIENT`] sign-ins from one client
//! and at most [`OVERALL`] from all clients together are compared with the tokens
//! and fail; past either, the attempt is refused with the time until a slot frees
//! up (the handler answers 429 with `Retry-After`) before any token is compared.
//! A slot is taken before the comparison and given back only when the token was
//! right, so concurrent guesses cannot overshoot the limits, and an operator who
//! signs in is never counted. The client is the TCP peer's address (an IPv6
//! client by its /64, the block one host is usually given), never a header a
//! client writes. Memory is bounded: only clients with a failure inside the
//! window are kept, and at most twice [`OVERALL`] of them at any time. Refusals
//! are written to the log as one warning per [`SUMMARY_INTERVAL`], never one per
//! attempt, so a guesser cannot flood the log either.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

/// The sliding window failures are counted over.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Failed sign-ins one client may make per window (DESIGN §1).
pub const PER_CLIENT: usize = 10;
/// Failed sign-ins all clients together may make per window: bounds a guess
/// spread over many addresses (at the price of locking everyone out for up to a
/// minute while one runs; the summary warning says so).
pub const OVERALL: usize = 100;
/// How often, at most, refused sign-ins are summed up in one warning.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// Clients named in one summary warning (the count covers the rest).
const SUMMARY_CLIENTS: usize = 8;

/// Who signs in, as far as the throttle can tell: an IPv4 address, or the /64 of
/// an IPv6 one (IPv4-mapped IPv6 addresses count as their IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Client {
    /// One IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
    /// No peer address known (a router driven without a listener): one shared client.
    Unknown,
}

impl Client {
    /// The client of a peer address.
    pub fn of(addr: Option<IpAddr>) -> Self {
        match addr.map(|a| a.to_canonical()) {
            Some(IpAddr::V4(v4)) => Self::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => {
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                Self::V6(prefix)
            }
            None => Self::Unknown,
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            Self::V6(p) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(full))
            }
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

/// The request's TCP peer, as the HTTP server records it (`ConnectInfo`); `None`
/// when the router runs without the server.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddress(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip()),
        ))
    }
}

/// The limits of one throttle.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The sliding window.
    pub window: Duration,
    /// Failures per client per window.
    pub per_client: usize,
    /// Failures of all clients per window.
    pub overall: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            window: WINDOW,
            per_client: PER_CLIENT,
            overall: OVERALL,
        }
    }
}

/// A sign-in being checked: holds one slot until [`Throttle::succeeded`] gives it
/// back or [`Throttle::failed`] keeps it for the window.
#[derive(Debug)]
#[must_use = "an attempt ends as succeeded or failed"]
pub struct Attempt {
    client: Client,
    at: Instant,
}

/// What the summary warning has to say.
#[derive(Debug, Default)]
struct Summary {
    failed: u64,
    throttled: u64,
    clients: BTreeSet<Client>,
    /// Clients refused beyond those kept in `clients`.
    more_clients: bool,
    scheduled: bool,
}

#[derive(Debug, Default)]
struct Slots {
    overall: VecDeque<Instant>,
    clients: HashMap<Client, VecDeque<Instant>>,
    summary: Summary,
}

/// Failed sign-ins of one application; see the module documentation.
#[derive(Debug)]
pub struct Throttle {
    limits: Limits,
    summary_interval: Duration,
    slots: Mutex<Slots>,
}

/// Drops the instants of `slots` older than the window before `now`.
fn expire(slots: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while slots
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        slots.pop_front();
    }
}

/// The wait until the oldest of `slots` leaves the window.
fn wait(slots: &VecDeque<Instant>, now: Instant, window: Duration) -> Duration {
    slots
        .front()
        .map(|t| (*t + window).saturating_duration_since(now))
        .unwrap_or_default()
}

fn give_back(slots: &mut VecDeque<Instant>, at: Instant) {
    if let Some(i) = slots.iter().rposition(|t| *t == at) {
        slots.remove(i);
    }
}

impl Throttle {
    /// A throttle with `limits`, summing up every `summary_interval`.
    pub fn new(limits: Limits, summary_interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            limits,
            summary_interval,
            slots: Mutex::new(Slots::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for one sign-in of `client` at `now`, or refuses it with the
    /// time until one frees up (never zero).
    pub fn begin(self: &Arc<Self>, client: Client, now: Instant) -> Result<Attempt, Duration> {
        let Limits {
            window,
            per_client,
            overall,
        } = self.limits;
        let mut guard = self.lock();
        let slots = &mut *guard;
        expire(&mut slots.overall, now, window);
        let mine = slots.clients.entry(client).or_default();
        expire(mine, now, window);
        let refused = if mine.len() >= per_client {
            Some(wait(mine, now, window))
        } else if slots.overall.len() >= overall {
            Some(wait(&slots.overall, now, window))
        } else {
            mine.push_back(now);
            slots.overall.push_back(now);
            None
        };
        if slots.clients.len() > overall.saturating_mul(2) {
            // Every kept instant of a client is also one of `overall`'s (or was
            // given back), so after this at most `overall` clients remain.
            slots.clients.retain(|_, s| {
                expire(s, now, window);
                !s.is_empty()
            });
        }
        let Some(wait) = refused else {
            return Ok(Attempt { client, at: now });
        };
        let summary = &mut slots.summary;
        summary.throttled += 1;
        if summary.clients.len() < SUMMARY_CLIENTS {
            summary.clients.insert(client);
        } else if !summary.clients.contains(&client) {
            summary.more_clients = true;
        }
        let schedule = !std::mem::replace(&mut summary.scheduled, true);
        drop(guard);
        if schedule {
            self.schedule_summary();
        }
        Err(wait.max(Duration::from_secs(1)))
    }

    /// The token was right: the attempt's slot is given back.
    pub fn succeeded(&self, attempt: Attempt) {
        let mut slots = self.lock();
        give_back(&mut slots.overall, attempt.at);
        if let Some(mine) = slots.clients.get_mut(&attempt.client) {
            give_back(mine, attempt.at);
            if mine.is_empty() {
                slots.clients.remove(&attempt.client);
            }
        }
    }

    /// The token was wrong: the slot stays taken for the window.
    pub fn failed(self: &Arc<Self>, _attempt: Attempt) {
        let schedule = {
            let mut slots = self.lock();
            slots.summary.failed += 1;
            !std::mem::replace(&mut slots.summary.scheduled, true)
        };
        if schedule {
            self.schedule_summary();
        }
    }

    /// The first refusal of a quiet period opens an interval; its end writes the
    /// one warning with everything refused meanwhile.
    fn schedule_summary(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let throttle = Arc::clone(self);
        runtime.spawn(async move {
            tokio::time::sleep(throttle.summary_interval).await;
            throttle.summarize();
        });
    }

    /// Writes the summary warning (if anything was refused) and starts afresh.
    pub fn summarize(&self) {
        let summary = std::mem::take(&mut self.lock().summary);
        if summary.failed == 0 && summary.throttled == 0 {
            return;
        }
        let mut clients: Vec<String> = summary.clients.iter().map(Client::to_string).collect();
        if summary.more_clients {
            clients.push("…".to_owned());
        }
        tracing::warn!(
            failed = summary.failed,
            throttled = summary.throttled,
            throttled_clients = %clients.join(", "),
            interval_s = self.summary_interval.as_secs(),
            per_client_limit = self.limits.per_client,
            overall_limit = self.limits.overall,
            "ops console: sign-ins refused (wrong token, or throttled with 429)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Arc<Throttle> {
        Throttle::new(
            Limits {
                window: Duration::from_secs(60),
                per_client: 3,
                overall: 5,
            },
            Duration::from_secs(60),
        )
    }

    fn ip(text: &str) -> Client {
        Client::of(Some(text.parse().unwrap()))
    }

    /// The failure past the per-client limit is refused until the oldest leaves
    /// the window, while another client still gets its slots.
    #[test]
    fn a_client_is_refused_past_its_failures_until_the_window_moves() {
        let t = small();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for i in 0..3 {
            t.failed(t.begin(a, t0 + Duration::from_secs(i)).unwrap());
        }
        let wait = t.begin(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_secs(50),
            "until the first failure is a minute old"
        );
        t.failed(t.begin(ip("192.0.2.2"), t0).unwrap());
        // A minute after the first failure, one slot is free again.
        t.failed(t.begin(a, t0 + Duration::from_secs(60)).unwrap());
        assert!(t.begin(a, t0 + Duration::from_secs(60)).is_err());
    }

    /// A right token gives its slot back: signing in is never counted.
    #[test]
    fn a_success_gives_the_slot_back() {
        let t = small();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..10 {
            t.succeeded(t.begin(a, t0).unwrap());
        }
        for _ in 0..3 {
            t.failed(t.begin(a, t0).unwrap());
        }
        assert!(t.begin(a, t0).is_err());
    }

    /// Slots are taken before the comparison: attempts in flight at once count.
    #[test]
    fn attempts_in_flight_count_against_the_limit() {
        let t = small();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let held: Vec<Attempt> = (0..3).map(|_| t.begin(a, t0).unwrap()).collect();
        assert!(t.begin(a, t0).is_err(), "a fourth while three are checked");
        for attempt in held {
            t.failed(attempt);
        }
    }

    /// Failures spread over many clients stop at the overall limit.
    #[test]
    fn many_clients_together_stop_at_the_overall_limit() {
        let t = small();
        let t0 = Instant::now();
        for i in 0..5 {
            t.failed(t.begin(ip(&format!("198.51.100.{i}")), t0).unwrap());
        }
        let wait = t
            .begin(ip("198.51.100.99"), t0 + Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(59));
        assert!(
            t.begin(ip("198.51.100.99"), t0 + Duration::from_secs(60))
                .is_ok()
        );
    }

    /// However many addresses fail, only those inside the window are kept, and
    /// never more than twice the overall limit.
    #[test]
    fn memory_is_bounded_by_the_overall_limit() {
        let t = small();
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_secs(u64::from(i) * 13);
            let client = Client::of(Some(IpAddr::from(i.to_be_bytes())));
            if let Ok(attempt) = t.begin(client, now) {
                t.failed(attempt);
            }
            assert!(t.lock().clients.len() <= 2 * 5 + 1, "at {i}");
        }
    }

    /// An IPv6 client is its /64 and an IPv4-mapped address its IPv4 address, so
    /// rotating through a host's addresses does not reset the count.
    #[test]
    fn clients_are_addresses_and_ipv6_blocks() {
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff::9"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:192.0.2.7"), ip("192.0.2.7"));
        assert_eq!(ip("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(Client::of(None), Client::Unknown);
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_owned).collect()
        }
    }

    /// Wrong tokens and throttled attempts are written as one warning at the end
    /// of the interval, with their counts and the clients, never one per attempt.
    #[tokio::test(start_paused = true)]
    async fn refusals_are_summed_up_in_one_warning_per_interval() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        let _log = tracing::subscriber::set_default(subscriber);
        let t = small();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            t.failed(t.begin(a, t0).unwrap());
        }
        for _ in 0..20 {
            assert!(t.begin(a, t0).is_err());
        }
        tokio::task::yield_now().await;
        assert!(
            buffer.lines().is_empty(),
            "nothing before the interval ends"
        );
        tokio::time::sleep(Duration::from_secs(61)).await;
        let lines = buffer.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains("failed=3") && line.contains("throttled=20"),
            "{line}"
        );
        assert!(line.contains("192.0.2.1"), "{line}");
        // A quiet interval writes nothing; the next refusal opens a new one.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(buffer.lines().len(), 1);
        assert!(t.begin(a, t0).is_err());
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(buffer.lines().len(), 2);
    }

    /// The refused wait is never zero, so `Retry-After` is at least 1.
    #[test]
    fn a_refusal_waits_at_least_a_second() {
        let t = small();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            t.failed(t.begin(a, t0).unwrap());
        }
        let wait = t.begin(a, t0 + Duration::from_millis(59_999)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
    }
}
