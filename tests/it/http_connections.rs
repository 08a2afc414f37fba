//! HTTP connection lifetimes (`[http] idle_timeout_ms`, `max_connection_age_ms`):
//! no client keeps a connection slot by keeping its connection busy or by moving
//! bytes that are no request. Cleartext HTTP/2 is not served (a client opening
//! with its preface is closed at once); a connection is idle from the end of its
//! last request whatever bytes it sends; a connection older than
//! `max_connection_age_ms` is told `Connection: close` and is closed, hard after
//! `shutdown_grace_ms` if a request of it never ends.

use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// A cleartext HTTP/2 client with prior knowledge: the preface, its SETTINGS,
/// one request (`GET /healthz`, as a client opening a stream now and then would),
/// then a PING every second. Returns how long after the connect the server
/// closed the connection, or `None` if it was still open after `give_up`.
async fn pinging_http2_client(port: u16, give_up: Duration) -> Option<Duration> {
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const PING: u8 = 0x6;
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(h2_frame(SETTINGS, 0, 0, &[]));
    // HPACK from the static table: :method GET, :scheme http, then :path
    // `/healthz` and :authority `x` as literals without indexing.
    let mut block = vec![0x82, 0x86, 0x04, 8];
    block.extend(b"/healthz");
    block.extend([0x01, 1, b'x']);
    // END_STREAM | END_HEADERS
    opening.extend(h2_frame(HEADERS, 0x5, 1, &block));
    if stream.write_all(&opening).await.is_err() {
        return Some(started.elapsed());
    }
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        if started.elapsed() > give_up {
            return None;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                // Frames from the server (SETTINGS, the answer, PING acks) are not
                // looked at: only the end of the connection matters here.
                Ok(0) | Err(_) => return Some(started.elapsed()),
                Ok(_) => {}
            },
            _ = tick.tick() => {
                if stream.write_all(&h2_frame(PING, 0, 0, &[7; 8])).await.is_err() {
                    return Some(started.elapsed());
                }
            }
        }
    }
}

/// Sends `request` on a kept-alive connection and reads one response: its head
/// (lower case) and body, or `None` when the server closed the connection.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Option<(String, Vec<u8>)> {
    stream.write_all(request).await.ok()?;
    read_response(stream).await
}

/// Reads one response (head and `Content-Length` body) from `stream`.
async fn read_response(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while data.len() < head_end + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    Some((head, data[head_end..head_end + length].to_vec()))
}

/// Waits (up to `limit`) for the server to close `stream`, reading and dropping
/// anything it still sends; whether it did.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// A client with a fresh connection for every request.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// With `max_connections = 4`, four cleartext HTTP/2 clients that open a stream
/// and then PING every second do not keep a fifth client out beyond the idle
/// timeout (they are closed at once: only HTTP/1.1 is served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinging_http2_clients_do_not_keep_a_fifth_client_out() {
    let idle = Duration::from_secs(2);
    let app = spawn_app_with(TestOptions {
        extra_config: format!(
            "[http]\nmax_connections = 4\nheader_read_timeout_ms = 60000\nidle_timeout_ms = {}\n",
            idle.as_millis()
        ),
        ..Default::default()
    })
    .await;
    let mut pingers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let port = app.port;
        pingers.spawn(pinging_http2_client(port, Duration::from_secs(30)));
    }
    // Give the four time to connect, be accepted and take every slot they can.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fifth = fresh_client()
        .get(format!("{}/healthz", app.address))
        .timeout(idle + Duration::from_secs(3))
        .send()
        .await;

    let fifth = fifth.expect("the fifth client is answered within the idle timeout");
    assert_eq!(fifth.status(), 200);
    while let Some(pinger) = pingers.join_next().await {
        let closed = pinger.unwrap();
        assert!(
            closed.is_some_and(|after| after < idle),
            "an HTTP/2 client is closed without being served: {closed:?}"
        );
    }
    app.stop().await.unwrap();
}

/// After its last request, a connection that keeps sending bytes which are no
/// request (blank lines) is closed after the idle timeout, not at the much longer
/// header read timeout: bytes are not activity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_without_a_request_do_not_keep_a_connection_open() {
    let idle = Duration::from_millis(1500);
    let app = spawn_app_with(TestOptions {
        extra_config: format!(
            "[http]\nheader_read_timeout_ms = 60000\nidle_timeout_ms = {}\n",
            idle.as_millis()
        ),
        ..Default::default()
    })
    .await;
    let mut stream = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let (head, _) = exchange(&mut stream, HEALTH).await.expect("answered");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let answered = Instant::now();

    // A blank line every 300 ms: bytes move, no request starts.
    let mut buf = [0u8; 64];
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let closed = loop {
        if answered.elapsed() > Duration::from_secs(20) {
            break None;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break Some(answered.elapsed()),
                Ok(_) => panic!("no answer is due"),
            },
            _ = tick.tick() => {
                if stream.write_all(b"\r\n").await.is_err() {
                    break Some(answered.elapsed());
                }
            }
        }
    };

    let closed = closed.expect("the connection is closed");
    assert!(closed >= idle - Duration::from_millis(100), "{closed:?}");
    assert!(
        closed < idle + Duration::from_secs(3),
        "closed after {closed:?}, not at the idle timeout"
    );
    app.stop().await.unwrap();
}

/// With `max_connections = 1`, a client that sends a request every 100 ms on one
/// kept-alive connection is closed once the connection is older than
/// `max_connection_age_ms`, and a second client waiting for the slot is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_gives_its_slot_back_at_its_max_age() {
    let age = Duration::from_secs(2);
    let app = spawn_app_with(TestOptions {
        extra_config: format!(
            "[http]\nmax_connections = 1\nheader_read_timeout_ms = 60000\n\
             idle_timeout_ms = 60000\nmax_connection_age_ms = {}\n",
            age.as_millis()
        ),
        ..Default::default()
    })
    .await;
    let started = Instant::now();
    let mut busy = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let (head, _) = exchange(&mut busy, HEALTH).await.expect("answered");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let port = app.port;
    let busy = tokio::spawn(async move {
        let mut answered = 1;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match exchange(&mut busy, HEALTH).await {
                Some((head, _)) if head.contains("connection: close") => {
                    // Told to go: the server closes after this answer.
                    let closed = closed_within(&mut busy, Duration::from_secs(5)).await;
                    return (answered + 1, started.elapsed(), closed);
                }
                Some(_) => answered += 1,
                None => return (answered, started.elapsed(), true),
            }
            if started.elapsed() > Duration::from_secs(30) {
                return (answered, started.elapsed(), false);
            }
        }
    });
    // Connected while the busy client holds the only slot.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let waiting = fresh_client()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(age + Duration::from_secs(3))
        .send()
        .await;

    let waiting = waiting.expect("the waiting client is served once the busy one is closed");
    assert_eq!(waiting.status(), 200);
    let waited = started.elapsed();
    let (answered, ended, closed) = busy.await.unwrap();
    assert!(closed, "the busy connection is closed");
    assert!(
        answered > 5,
        "the busy client was served meanwhile: {answered}"
    );
    assert!(
        ended >= age && waited >= age,
        "nothing closed before the age: {ended:?}, {waited:?}"
    );
    app.stop().await.unwrap();
}

/// A request in flight when its connection passes `max_connection_age_ms` is
/// answered with `Connection: close`, and the connection is then closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_the_max_age_is_answered_with_connection_close() {
    let age = Duration::from_millis(1500);
    let app = spawn_app_with(TestOptions {
        extra_config: format!(
            "[http]\nheader_read_timeout_ms = 60000\nidle_timeout_ms = 60000\n\
             max_connection_age_ms = {}\n",
            age.as_millis()
        ),
        ..Default::default()
    })
    .await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let (head, _) = exchange(&mut stream, HEALTH).await.expect("answered");
    assert!(!head.contains("connection: close"), "{head}");
    // A webhook whose body is still on its way when the connection comes of age.
    stream
        .write_all(
            b"POST /webhooks/clerk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 2\r\n\r\n{",
        )
        .await
        .unwrap();
    tokio::time::sleep_until((started + age + Duration::from_millis(500)).into()).await;
    stream.write_all(b"}").await.unwrap();

    let (head, _) = read_response(&mut stream).await.expect("answered");

    // Unsigned, so refused; what matters is that it is answered, then the end.
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)).await,
        "closed after the answer"
    );
    app.stop().await.unwrap();
}

/// A request that never ends (a body trickled for ever, under long body
/// deadlines) does not keep a connection past `max_connection_age_ms` plus
/// `shutdown_grace_ms`: the connection is then closed hard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_ends_does_not_keep_an_old_connection_open() {
    let age = Duration::from_millis(1000);
    let grace = Duration::from_millis(1000);
    let app = spawn_app_with(TestOptions {
        extra_config: format!(
            "[http]\nheader_read_timeout_ms = 60000\nidle_timeout_ms = 60000\n\
             body_read_timeout_ms = 60000\nwebhook_body_timeout_ms = 60000\n\
             max_connection_age_ms = {}\nshutdown_grace_ms = {}\n",
            age.as_millis(),
            grace.as_millis()
        ),
        ..Default::default()
    })
    .await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    stream
        .write_all(
            b"POST /webhooks/clerk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n",
        )
        .await
        .unwrap();

    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut answer = Vec::new();
    let closed = loop {
        if started.elapsed() > Duration::from_secs(20) {
            break None;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break Some(started.elapsed()),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick() => {
                if stream.write_all(b" ").await.is_err() {
                    break Some(started.elapsed());
                }
            }
        }
    };

    let closed = closed.expect("the connection is closed");
    assert!(closed >= age + grace, "closed after {closed:?}");
    assert!(
        closed < age + grace + Duration::from_secs(3),
        "closed after {closed:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "",
        "closed without an answer"
    );
    app.stop().await.unwrap();
}
