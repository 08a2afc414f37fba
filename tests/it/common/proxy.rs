//! A TCP proxy a test can cut and restore, to simulate an outage of a real service
//! (RabbitMQ or PostgreSQL) without touching the machine's shared server, or stall,
//! to simulate a peer that keeps its connections open but stops answering.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

/// A running proxy.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<Mutex<CancellationToken>>,
    stalled: Arc<watch::Sender<bool>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy {
            addr,
            up: Arc::new(AtomicBool::new(true)),
            generation: Arc::new(Mutex::new(CancellationToken::new())),
            stalled: Arc::new(watch::channel(false).0),
            stop: CancellationToken::new(),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = p.stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                if !p.up.load(Ordering::SeqCst) {
                    drop(client); // refused: the "service" is down
                    continue;
                }
                let token = p.generation.lock().await.clone();
                let stalled = p.stalled.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = pump(client_read, server_write, stalled.clone()) => {}
                        _ = pump(server_read, client_write, stalled) => {}
                    }
                });
            }
        });
        proxy
    }

    /// Kills every open connection and refuses new ones.
    pub async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut generation = self.generation.lock().await;
        generation.cancel();
        *generation = CancellationToken::new();
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Keeps every connection (and new ones) open but forwards nothing, either way,
    /// until [`Proxy::unstall`]: a peer that stopped answering.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Forwards again; bytes held during the stall are delivered.
    pub fn unstall(&self) {
        self.stalled.send_replace(false);
    }

    /// Stops the proxy.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

/// Copies `from` to `to`, holding each chunk while the proxy is stalled.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Read during a stall: hold it until the stall ends.
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if Arc::strong_count(&self.up) == 1 {
            self.stop.cancel();
        }
    }
}
