//! [`FaultProxy`]: a loopback TCP proxy between a client and a real
//! server, for tests, that injects the faults a network brings: added
//! latency, a black hole (the connection stays open and nothing passes: no
//! FIN, no RST, as when a firewall drops packets or a host vanishes), a
//! reset of every open connection, and a stall of one direction.
//!
//! ```no_run
//! use std::time::Duration;
//! use reliability_redis::harness::RedisServer;
//! use reliability_redis::proxy::FaultProxy;
//!
//! let server = RedisServer::start();
//! let proxy = FaultProxy::start(server.port());
//! let cfg = proxy.config(&server); // the server's settings, through the proxy
//! proxy.set_latency(Duration::from_millis(80)); // each way
//! proxy.black_hole();
//! proxy.heal();
//! # let _ = cfg;
//! ```
//!
//! The proxy runs on its own thread and runtime, so a test runtime that is
//! busy (or a current-thread one blocked in a call) never slows it. It
//! stops when dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reliability_core::config::{RedisConfig, RedisUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::harness::RedisServer;

/// A direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the server (requests).
    ToServer,
    /// From the server to the client (replies).
    ToClient,
}

/// The faults in force; every connection follows changes at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Faults {
    /// Added to every chunk, each way.
    latency: Duration,
    /// Nothing passes during this long after a connection opens: a slow
    /// handshake (TLS, a Sentinel lookup) as the client sees it.
    connect_delay: Duration,
    /// Bytes read are dropped; nothing is written; nothing is closed.
    black_hole: bool,
    /// Bytes are held (not dropped) until the stall ends.
    stall_to_server: bool,
    stall_to_client: bool,
    /// Bumped by [`FaultProxy::reset`]: open connections are reset.
    resets: u64,
}

impl Faults {
    fn stalled(&self, dir: Direction) -> bool {
        match dir {
            Direction::ToServer => self.stall_to_server,
            Direction::ToClient => self.stall_to_client,
        }
    }
}

/// A fault-injecting loopback TCP proxy; see the [module docs](self).
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    faults: Arc<watch::Sender<Faults>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to
    /// `127.0.0.1:target_port`, passing everything through.
    ///
    /// # Panics
    /// When no loopback port can be bound or the thread cannot start.
    pub fn start(target_port: u16) -> Self {
        let std_listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind a loopback port for the proxy");
        std_listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = std_listener.local_addr().expect("local addr").port();
        let (faults, _) = watch::channel(Faults::default());
        let faults = Arc::new(faults);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&faults);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                    tokio::select! {
                        () = accept_loop(listener, target_port, shared) => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn the proxy thread");
        Self {
            port,
            faults,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<proxy port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `server`'s client settings (credentials included), through the proxy.
    ///
    /// # Panics
    /// If the proxy's URL is refused (it never is).
    pub fn config(&self, server: &RedisServer) -> RedisConfig {
        let mut cfg = server.config();
        cfg.url = Some(RedisUrl::new(self.url()).expect("proxy url"));
        cfg
    }

    /// Holds the first bytes of every new connection until `delay` after
    /// it opened (0 removes it): a handshake that slow.
    pub fn set_connect_delay(&self, delay: Duration) {
        self.faults.send_modify(|f| f.connect_delay = delay);
    }

    /// Adds `each_way` to every chunk in both directions (0 removes it).
    pub fn set_latency(&self, each_way: Duration) {
        self.faults.send_modify(|f| f.latency = each_way);
    }

    /// From now on every open and new connection stays open while nothing
    /// passes: bytes read from either side are dropped, nothing is written,
    /// nothing is closed.
    pub fn black_hole(&self) {
        self.faults.send_modify(|f| f.black_hole = true);
    }

    /// Holds the bytes of `dir` (they pass, in order, when the stall ends);
    /// the other direction flows.
    pub fn stall(&self, dir: Direction) {
        self.faults.send_modify(|f| match dir {
            Direction::ToServer => f.stall_to_server = true,
            Direction::ToClient => f.stall_to_client = true,
        });
    }

    /// Resets (RST) every connection open now; new ones are accepted.
    pub fn reset(&self) {
        self.faults.send_modify(|f| f.resets += 1);
    }

    /// Ends every fault: no latency, no connect delay, no black hole, no
    /// stall. Bytes a black
    /// hole dropped stay lost (the connections that lost them are out of
    /// step with the server: a client must replace them).
    pub fn heal(&self) {
        self.faults.send_modify(|f| {
            *f = Faults {
                resets: f.resets,
                ..Faults::default()
            }
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, target_port: u16, faults: Arc<watch::Sender<Faults>>) {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, target_port));
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, or the like: not a busy loop.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let faults = faults.subscribe();
        tokio::spawn(async move {
            // A refused upstream closes the client's side: as a dead server.
            if let Ok(server) = TcpStream::connect(target).await {
                proxy_connection(client, server, faults).await;
            }
        });
    }
}

/// Pumps both directions until both sides closed, or a reset comes.
async fn proxy_connection(client: TcpStream, server: TcpStream, faults: watch::Receiver<Faults>) {
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        // Closing a socket with linger 0 sends RST instead of FIN: what
        // `reset` needs, and what a dead peer's kernel sends anyway.
        let _ = s.set_zero_linger();
    }
    let resets = faults.borrow().resets;
    let opened = Instant::now();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, (Direction::ToServer, opened), faults.clone()));
    let down = tokio::spawn(pump(sr, cw, (Direction::ToClient, opened), faults.clone()));
    let (up_abort, down_abort) = (up.abort_handle(), down.abort_handle());
    let mut watch_reset = faults;
    let reset = async {
        while watch_reset.changed().await.is_ok() {
            if watch_reset.borrow().resets != resets {
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        () = reset => {
            // The pumps own the halves: dropping them closes both sockets.
            up_abort.abort();
            down_abort.abort();
        }
    }
}

/// One direction (of a connection opened at `.1`): the reader stamps each
/// chunk with its arrival, the writer sends it once the latency (and the
/// connect delay) passed and no stall holds it.
async fn pump(
    mut from: OwnedReadHalf,
    to: OwnedWriteHalf,
    dir: (Direction, Instant),
    faults: watch::Receiver<Faults>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = write_side(to, rx, dir, faults.clone());
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if faults.borrow().black_hole {
                continue;
            }
            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
        // `from` stays open until the writer is done.
        from
    };
    let _ = tokio::join!(reader, writer);
}

async fn write_side(
    mut to: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    (dir, opened): (Direction, Instant),
    mut faults: watch::Receiver<Faults>,
) {
    while let Some((arrived, chunk)) = rx.recv().await {
        loop {
            let f = *faults.borrow_and_update();
            if f.black_hole {
                // Dropped: a black hole swallows what was in flight too.
                break;
            }
            let due = (arrived + f.latency).max(opened + f.connect_delay);
            if f.stalled(dir) || Instant::now() < due {
                let wait = if f.stalled(dir) {
                    Duration::from_secs(3600)
                } else {
                    due - Instant::now()
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    r = faults.changed() => if r.is_err() { return },
                }
                continue;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            break;
        }
    }
    let _ = to.shutdown().await;
}
