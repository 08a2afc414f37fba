//! A minimal HTTP/1.1 keep-alive client for the load tools.
//!
//! The load generator shares the machine's two cores with the service, the broker
//! and PostgreSQL, so every microsecond it spends is taken from what it measures.
//! A general client (reqwest: URL parsing, header maps, pool bookkeeping, body
//! streams) took about twice the CPU per webhook (docs/benchmarks.md, "Intake");
//! this one writes each request in one buffer and reads just the status line, the
//! framing headers and the body.
//! It speaks plain `http://` only, which is all the load tools target.

use std::io::Write as _;
use std::sync::Mutex;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// POSTs to one URL over a pool of kept-alive connections.
#[derive(Debug)]
pub struct PostClient {
    addr: String,
    host: String,
    path: String,
    idle: Mutex<Vec<Conn>>,
}

#[derive(Debug)]
struct Conn {
    stream: BufStream<TcpStream>,
    line: String,
    scratch: Vec<u8>,
}

impl PostClient {
    /// A client for `url` (`http://host:port/path`).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).with_context(|| format!("invalid URL {url}"))?;
        anyhow::ensure!(
            parsed.scheme() == "http",
            "the load tools speak plain http://, not {url}"
        );
        let host = parsed
            .host_str()
            .with_context(|| format!("no host in {url}"))?
            .to_owned();
        let port = parsed.port_or_known_default().unwrap_or(80);
        let mut path = parsed.path().to_owned();
        if let Some(q) = parsed.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Self {
            addr: format!("{host}:{port}"),
            host: format!("{host}:{port}"),
            path,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// POSTs a JSON `body` with extra `headers`; the response status.
    pub async fn post(&self, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<u16> {
        let mut request = Vec::with_capacity(body.len() + 256);
        write!(
            request,
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            self.path,
            self.host,
            body.len()
        )?;
        for (name, value) in headers {
            write!(request, "{name}: {value}\r\n")?;
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body);

        let pooled = self.idle.lock().expect("pool lock").pop();
        if let Some(mut conn) = pooled {
            // A kept-alive connection the server closed meanwhile fails before any
            // response; only then is the request sent again on a new one.
            match conn.round_trip(&request).await {
                Ok((status, keep)) => {
                    self.done(conn, keep);
                    return Ok(status);
                }
                Err(RoundTripError::BeforeResponse(_)) => {}
                Err(RoundTripError::During(e)) => return Err(e),
            }
        }
        let mut conn = Conn::connect(&self.addr).await?;
        match conn.round_trip(&request).await {
            Ok((status, keep)) => {
                self.done(conn, keep);
                Ok(status)
            }
            Err(RoundTripError::BeforeResponse(e) | RoundTripError::During(e)) => Err(e),
        }
    }

    fn done(&self, conn: Conn, keep: bool) {
        if keep {
            self.idle.lock().expect("pool lock").push(conn);
        }
    }
}

enum RoundTripError {
    /// Nothing of a response arrived (the request may not have been read).
    BeforeResponse(std::io::Error),
    /// The response broke off midway.
    During(std::io::Error),
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

impl Conn {
    async fn connect(addr: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufStream::new(stream),
            line: String::new(),
            scratch: Vec::new(),
        })
    }

    /// Sends one request and reads its whole response: (status, keep-alive).
    async fn round_trip(&mut self, request: &[u8]) -> Result<(u16, bool), RoundTripError> {
        let sent = async {
            self.stream.write_all(request).await?;
            self.stream.flush().await?;
            self.line.clear();
            match self.stream.read_line(&mut self.line).await? {
                0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ => Ok(()),
            }
        };
        sent.await.map_err(RoundTripError::BeforeResponse)?;
        self.rest().await.map_err(RoundTripError::During)
    }

    /// Parses the status line in `self.line`, then reads headers and body.
    async fn rest(&mut self) -> std::io::Result<(u16, bool)> {
        let mut parts = self.line.split_ascii_whitespace();
        let version = parts.next().ok_or_else(|| bad("empty status line"))?;
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status code"))?;
        let mut keep = version == "HTTP/1.1";
        let mut length: Option<usize> = None;
        let mut chunked = false;
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = self.line.trim_end();
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(bad("malformed header"));
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse().map_err(|_| bad("bad content-length"))?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                keep = !value.eq_ignore_ascii_case("close");
            }
        }
        if chunked {
            loop {
                self.line.clear();
                self.stream.read_line(&mut self.line).await?;
                let size =
                    usize::from_str_radix(self.line.trim_end().split(';').next().unwrap_or(""), 16)
                        .map_err(|_| bad("bad chunk size"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        self.line.clear();
                        if self.stream.read_line(&mut self.line).await? == 0
                            || self.line.trim_end().is_empty()
                        {
                            break;
                        }
                    }
                    break;
                }
                self.skip(size + 2).await?;
            }
        } else if let Some(n) = length {
            self.skip(n).await?;
        } else if status >= 200 && status != 204 && status != 304 {
            // Delimited by the end of the connection.
            self.scratch.clear();
            self.stream.read_to_end(&mut self.scratch).await?;
            keep = false;
        }
        Ok((status, keep))
    }

    async fn skip(&mut self, n: usize) -> std::io::Result<()> {
        self.scratch.resize(n, 0);
        self.stream.read_exact(&mut self.scratch).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;

    #[tokio::test]
    async fn posts_and_keeps_the_connection() {
        let app = axum::Router::new()
            .route(
                "/hook",
                post(|body: String| async move {
                    if body.contains("ok") {
                        (axum::http::StatusCode::OK, "{\"status\":\"queued\"}")
                    } else {
                        (axum::http::StatusCode::BAD_REQUEST, "{\"error\":{}}")
                    }
                }),
            )
            .route(
                "/stream",
                post(|| async {
                    axum::body::Body::from_stream(futures_util::stream::iter(vec![
                        Ok::<_, std::io::Error>("a"),
                        Ok("bc"),
                    ]))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let client = PostClient::new(&format!("http://{addr}/hook")).unwrap();
        for _ in 0..3 {
            assert_eq!(client.post(&[("x-test", "1")], b"ok").await.unwrap(), 200);
            assert_eq!(client.post(&[], b"no").await.unwrap(), 400);
        }
        assert_eq!(client.idle.lock().unwrap().len(), 1, "one connection, kept");

        let chunked = PostClient::new(&format!("http://{addr}/stream")).unwrap();
        assert_eq!(chunked.post(&[], b"").await.unwrap(), 200);
        assert_eq!(chunked.post(&[], b"").await.unwrap(), 200);
        assert_eq!(chunked.idle.lock().unwrap().len(), 1);

        assert!(PostClient::new("https://example.com/").is_err());
    }
}
