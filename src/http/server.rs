//! The HTTP server under [`super::app`]: accepts connections up to `[http]
//! max_connections` and serves each with hyper's HTTP/1.1, closing what a slow,
//! idle or long-lived client holds.
//!
//! Guarantee: no client holds a connection slot, a task or a buffer longer than
//! the configured deadlines allow — a request head must arrive within
//! `header_read_timeout_ms` (the first one counted from the accept, later ones on
//! a kept-alive connection from the end of the previous response), a body within
//! `body_read_timeout_ms` of its head (see [`body_deadline`]), a connection with
//! no request in flight for `idle_timeout_ms` since its last request ended is
//! closed (bytes that are no request, such as blank lines, do not count), and a
//! connection older than `max_connection_age_ms` is told to close (`Connection:
//! close` on the response in flight, or closed at once when none is) and is closed
//! for good after `shutdown_grace_ms` more. So a client that keeps its connection
//! busy still gives its slot back. Past `max_connections` the listener stops
//! accepting (new clients wait in the kernel's backlog) until a connection ends. On
//! `stop` the listener closes and every connection finishes its requests and
//! closes; dropping the future of [`serve`] ends every connection at once.
//!
//! Only HTTP/1.1 (and 1.0) is spoken: no client of this service needs cleartext
//! HTTP/2 (Svix, the main application and Prometheus speak HTTP/1.1, and a TLS
//! proxy in front speaks HTTP/1.1 to its upstreams unless told otherwise), and
//! HTTP/2 would multiply every per-connection bound by its concurrent streams and
//! bring control frames (PING, SETTINGS, resets) that move bytes without a
//! request. A client that opens with the HTTP/2 preface is closed at once.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use http_body::Frame;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::HttpSettings;

/// The connection-level limits of `[http]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deadline of a request head.
    pub header_read: Duration,
    /// A connection with no request in flight this long since its last request
    /// ended is closed.
    pub idle: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// A connection this old is told to close; `None`: no limit.
    pub max_age: Option<Duration>,
    /// How long a connection told to close for its age may still finish the
    /// request it has in flight before it is closed hard.
    pub age_grace: Duration,
}

impl Limits {
    /// The limits the settings name.
    pub fn of(http: &HttpSettings) -> Self {
        Self {
            header_read: Duration::from_millis(http.header_read_timeout_ms),
            idle: Duration::from_millis(http.idle_timeout_ms),
            max_connections: http.max_connections,
            max_age: (http.max_connection_age_ms > 0)
                .then(|| Duration::from_millis(http.max_connection_age_ms)),
            age_grace: Duration::from_millis(http.shutdown_grace_ms),
        }
    }
}

/// Connections the kernel completes and queues for [`serve`] to accept. tokio's
/// `TcpListener::bind` asks for 128, so a burst of new clients (or clients waiting
/// past `max_connections`) soon has its SYNs dropped and retried a second later;
/// the kernel caps this at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the HTTP listener (address reuse on, as tokio's `bind`) with
/// [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `app` on `listener` until `stop` is cancelled and every connection has
/// finished; see the module documentation for the limits.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // A JoinSet, not detached tasks: dropping this future aborts every connection.
    let mut connections = JoinSet::new();
    let mut warned_full = false;
    loop {
        while connections.try_join_next().is_some() {}
        // The slot is taken before the accept: past the cap, clients queue in the
        // kernel's backlog instead of each costing a task and buffers here.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                warned_full = false;
                permit
            }
            Err(_) => {
                if !warned_full {
                    warned_full = true;
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "HTTP connection limit reached; new connections wait until one closes"
                    );
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                }
            }
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors and the like: accepting again at once
                        // would spin; the error is the operator's to see.
                        tracing::error!(error = %e, "accepting an HTTP connection failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(connection(
            stream,
            peer,
            app.clone(),
            limits,
            stop.clone(),
            permit,
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection, holding its slot until it ends.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let busy = Busy::start(&activity);
            let app = app.clone();
            // The TCP peer, as axum's `ConnectInfo`: the console's sign-in
            // throttle counts failures per client address.
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            async move {
                let response = app.oneshot(request).await;
                drop(busy);
                response
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);

    let mut closing = false;
    // Once this process closes a connection of its own accord, it gets this long to go.
    let mut hard_deadline: Option<Instant> = None;
    loop {
        let check = activity.next_check(&limits);
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(check), if !closing => {
                if let Some(close) = activity.expired(&limits) {
                    tracing::debug!(reason = close.reason(), "closing an HTTP connection");
                    closing = true;
                    hard_deadline = Some(Instant::now() + close.grace(&limits));
                    // HTTP/1.1: an idle connection closes now; one with a request in
                    // flight answers it with `Connection: close`, then closes.
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = activity.ended.notified(), if !closing => {}
            _ = sleep_until_some(hard_deadline) => return,
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why the watchdog closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// No request began within the header read timeout of the accept.
    NoRequest,
    /// No request in flight for the idle timeout since the last one ended.
    Idle,
    /// Older than `max_connection_age_ms`, whatever it is doing.
    Age,
}

impl Close {
    fn reason(self) -> &'static str {
        match self {
            Self::NoRequest => "no request within the header read timeout",
            Self::Idle => "idle",
            Self::Age => "older than max_connection_age_ms",
        }
    }

    /// How long the connection may take to finish before it is closed hard: a
    /// connection closed for its age may have a genuine request in flight, which
    /// gets the shutdown grace; the others have nothing in flight to wait for.
    fn grace(self, limits: &Limits) -> Duration {
        match self {
            Self::Age => limits.age_grace,
            Self::NoRequest | Self::Idle => limits.header_read,
        }
    }
}

/// What a connection has been doing, for its watchdog. Only requests count: bytes
/// that move without one (blank lines between requests, a response still being
/// written after its handler answered) never keep a connection open.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Milliseconds since `opened` of the last request ending.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    ended: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            ended: Notify::new(),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Why the connection should close now, if it should.
    fn expired(&self, limits: &Limits) -> Option<Close> {
        let now = Instant::now();
        if limits.max_age.is_some_and(|age| now >= self.opened + age) {
            return Some(Close::Age);
        }
        // Until its first request starts, a connection has the header deadline from
        // the accept, whatever it trickles (hyper's own header timer says the same;
        // this one does not depend on hyper polling for a head).
        if self.requests.load(Ordering::Relaxed) == 0 && now >= self.opened + limits.header_read {
            return Some(Close::NoRequest);
        }
        if self.in_flight.load(Ordering::Relaxed) == 0 && now >= self.last() + limits.idle {
            return Some(Close::Idle);
        }
        None
    }

    /// When [`Self::expired`] may next say yes (a request ending also wakes the
    /// watchdog, through `ended`).
    fn next_check(&self, limits: &Limits) -> Instant {
        let idle = self.last() + limits.idle;
        let check = if self.requests.load(Ordering::Relaxed) == 0 {
            idle.min(self.opened + limits.header_read)
        } else if self.in_flight.load(Ordering::Relaxed) > 0 {
            Instant::now() + limits.idle
        } else {
            idle
        };
        match limits.max_age {
            Some(age) => check.min(self.opened + age),
            None => check,
        }
    }
}

/// A request in flight on a connection, from the handler's start to its response.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.ended.notify_one();
    }
}

/// The error a request body answers with once its deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?}")]
pub struct BodyTimeout(pub Duration);

impl BodyTimeout {
    /// Whether `e` (or anything it wraps) is a body deadline.
    pub fn caused(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut current = Some(e);
        while let Some(e) = current {
            if e.is::<Self>() {
                return true;
            }
            current = e.source();
        }
        false
    }
}

/// Middleware: every request body must arrive within `limit` of the request head
/// being read; after it, reading the body fails with [`BodyTimeout`] (intake answers
/// 408 and the connection closes, its body unread). A request whose body has
/// already ended (a GET) has nothing to wait for and is passed on as it is; the
/// timer of the others is made the first time their body is not ready, so a body
/// that is all there costs no timer.
pub async fn body_deadline(limit: Duration, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let deadline = Instant::now() + limit;
    let request = request.map(|body| {
        Body::new(DeadlineBody {
            inner: body,
            deadline,
            timer: None,
            limit,
            expired: false,
        })
    });
    next.run(request).await
}

/// A body that fails once its deadline has passed.
struct DeadlineBody {
    inner: Body,
    deadline: Instant,
    /// Made on the first poll that finds no frame ready.
    timer: Option<Pin<Box<Sleep>>>,
    limit: Duration,
    expired: bool,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            self.expired = true;
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(self.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_deadline_is_found_inside_wrapping_errors() {
        let inner = axum::Error::new(BodyTimeout(Duration::from_secs(1)));
        let outer = axum::Error::new(inner);
        assert!(BodyTimeout::caused(&outer));
        assert!(!BodyTimeout::caused(&axum::Error::new(io::Error::other(
            "x"
        ))));
    }
}
