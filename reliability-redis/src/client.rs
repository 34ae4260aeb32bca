//! [`RedisClient`]: one pooled connection to a standalone server, a
//! Sentinel-managed master or a Redis Cluster, with every call bounded.
//!
//! The backends of this crate share one client. It is built from the
//! configuration model's [`RedisConfig`] and a [`KeySpace`]:
//!
//! ```no_run
//! # #[allow(dead_code)]
//! # async fn demo() -> reliability_core::Result<()> {
//! use reliability_core::config::{RedisConfig, RedisUrl};
//! use reliability_core::KeySpace;
//! use reliability_redis::RedisClient;
//!
//! let cfg = RedisConfig::standalone(RedisUrl::new("redis://127.0.0.1:6379/0")?);
//! let client = RedisClient::connect(&cfg, KeySpace::new("gateway", "webhooks")?).await?;
//! assert!(client.is_master().await?);
//! # Ok(()) }
//! ```
//!
//! # Deadlines
//!
//! Every call has two bounded parts: getting a connection (when none is
//! open: at most `poolTimeout` + `connectTimeout` waiting for the connect)
//! and the command itself (at most `responseTimeout`, enforced with one
//! timer around the command in every mode). A call that runs out of time
//! answers [`Error::Timeout`] or an *unavailable* error, never hangs.
//!
//! Callers often bound a call more tightly (a `Fallback`'s deadline, 250 ms
//! by default, is shorter than the 500 ms response timeout) and drop it
//! when their time is up. Two rules keep that from wedging the client:
//!
//! - **A connect runs in the background**, not in the caller that needed
//!   it: it completes (or fails) within `connectTimeout` even when every
//!   caller waiting for it gave up, so a connect slower than the callers'
//!   deadline (TLS, Sentinel) still ends with a connection.
//! - **A call dropped before its reply drops its connection**, unless that
//!   connection answered another call meanwhile (slow, not dead): the shared
//!   connection it ran on is replaced on the next call (as after an error).
//!   A black-holed connection (no FIN, no RST: nothing comes back, ever)
//!   would otherwise be kept until the kernel gives up, minutes later.
//!
//! # Connections
//!
//! Scripts and commands share **one multiplexed connection** (a cluster
//! connection in cluster mode): concurrent calls pipeline on it, so 64
//! concurrent calls cost the server one read and one write instead of 64 of
//! each, and a call costs the client a clone of the connection's handle, no
//! pool checkout. Measured on 2 cores, 64 tasks: `PING` 46 k/s on one
//! multiplexed connection against 23 k/s through a pool checkout per call;
//! the GCRA script 23 k/s on one connection against 15 k/s spread over 16.
//! Redis runs one command at a time anyway, so more connections add
//! syscalls, not parallelism.
//!
//! Pipelining needs calls to queue up before the connection's task
//! writes them. On a current-thread runtime they do (~13 requests per
//! `writev` at 64 tasks). On a multi-thread runtime tokio's LIFO slot runs
//! the connection's task right after each call's send, so it writes one
//! request per `writev` (strace: 16 k `writev` for 13 k claims): with the
//! claim script's server cost now the bottleneck, the bench's
//! multi-thread row gives 1.1-2.1x `redis-benchmark` against 1.8-1.9x on
//! the current-thread runtime (five runs, load ~2).
//!
//! `WAIT` blocks the connection it is sent on, so it never runs on the
//! shared connection: [`invoke_replicated`](RedisClient::invoke_replicated)
//! and [`wait_replicas`](RedisClient::wait_replicas) hold one of up to
//! `poolSize` exclusive connections of a pool for their whole call.
//!
//! When a call fails in a way that means the connection is broken or points
//! at the wrong server (I/O error, timeout, `READONLY` after a Sentinel
//! failover, `MASTERDOWN`), the shared connection and every idle pooled
//! one are dropped, so the next call connects afresh and, behind Sentinel,
//! asks the sentinels for the current master (deadpool#372: a pool
//! otherwise keeps writing to a demoted master). The cluster connection
//! reconnects its nodes itself and is kept.
//!
//! # TLS (feature `tls`)
//!
//! `rediss://` URLs connect with rustls: to a standalone server; behind
//! Sentinel, to the sentinels and to the master they name; on a Cluster,
//! to every node (all URLs of a list use one scheme). `tls.caFile`,
//! `certFile` and `keyFile` are read and checked when the client is built:
//! a missing or unreadable file is [`Error::Config`] naming its field. A
//! certificate refused in the handshake is [`Error::Backend`] saying so,
//! never *unavailable*: a fallback must not hide a deployment error.
//!
//! # Secrets
//!
//! `Debug` shows the mode, redacted addresses, database and timeouts; no
//! password appears in `Debug`, errors or log events.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool::managed::{Metrics, Object, Pool, RecycleResult, Timeouts};
use deadpool::Runtime;
use deadpool_redis::redis::aio::{ConnectionLike, MultiplexedConnection};
use deadpool_redis::redis::cluster::{ClusterClient, ClusterClientBuilder};
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, Client, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, Script, ServerErrorKind, Value,
};
use reliability_core::config::{OnEvictingPolicy, RedisConfig, RedisUrl};
use reliability_core::{Error, KeySpace, Result, SharedClock, UnavailableReason};

use crate::error::{self, Disposition};

/// A pooled connection older than this without use is PINGed before reuse
/// (standalone and Sentinel; the cluster client heals itself).
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Bounded retries of the cluster client (redirects, reconnects); the
/// response timeout bounds the whole call anyway.
const CLUSTER_RETRIES: u32 = 2;

/// A pooled Redis client: standalone, Sentinel or Cluster.
///
/// Cheap to clone (one `Arc`); clones share the pool.
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<Inner>,
    clock_override: Option<SharedClock>,
}

struct Inner {
    /// The connection every script and command pipelines on, once open.
    shared: RwLock<Option<Shared>>,
    /// The background connects: at most one runs at a time.
    connects: tokio::sync::watch::Sender<Connects>,
    /// Numbers the shared connections, so an error on an old one never
    /// drops its successor.
    generation: AtomicU64,
    /// Exclusive connections, for `WAIT` (it blocks its connection).
    pool: Pool<Manager>,
    key_space: KeySpace,
    mode: Mode,
    /// Redacted addresses, for `Debug` and messages.
    targets: Vec<String>,
    db: u32,
    pool_timeout: Duration,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Set by the Sentinel watcher while a failover is in progress.
    failover: AtomicBool,
    /// Replies counted so far, and the shared connection of the last one:
    /// a call dropped at its caller's deadline keeps a connection that
    /// answered meanwhile (slow, not dead).
    replies: AtomicU64,
    reply_generation: AtomicU64,
    /// The backends' scripts, loaded on every new connection (see
    /// [`RedisClient::preload`]).
    scripts: std::sync::Mutex<Vec<Script>>,
    /// The server's `maxmemory-policy`, cached (see `policy.rs`).
    policy: crate::policy::PolicyCache,
    on_evicting_policy: OnEvictingPolicy,
}

/// The shared connection and its generation.
#[derive(Clone)]
struct Shared {
    generation: u64,
    conn: Conn,
}

/// How the client reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// One server.
    Standalone,
    /// The master of a Sentinel deployment.
    Sentinel,
    /// A Redis Cluster.
    Cluster,
}

impl fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let status = i.pool.status();
        let connected = i.current().is_some();
        f.debug_struct("RedisClient")
            .field("mode", &i.mode)
            .field("targets", &i.targets)
            .field("db", &i.db)
            .field("key_space", &i.key_space)
            .field("connected", &connected)
            .field("pool_size", &status.max_size)
            .field("pool_idle", &status.available)
            .field("pool_timeout", &i.pool_timeout)
            .field("connect_timeout", &i.connect_timeout)
            .field("response_timeout", &i.response_timeout)
            .field("clock_override", &self.clock_override.is_some())
            .finish()
    }
}

impl RedisClient {
    /// Builds the client and checks the server answers `PING`, so a wrong
    /// address, a failed `AUTH` or a database the server lacks is reported
    /// at start.
    ///
    /// # Errors
    /// [`Error::Config`] for a configuration this client cannot use (naming
    /// `reliability.redis.db` for a database the server does not have);
    /// unavailable errors when Redis cannot be reached; [`Error::Backend`]
    /// ("authentication failed") for wrong credentials.
    pub async fn connect(cfg: &RedisConfig, key_space: KeySpace) -> Result<Self> {
        let client = Self::lazy(cfg, key_space)?;
        client
            .ping()
            .await
            .map_err(|e| missing_database(e, client.inner.db))?;
        tracing::debug!(client = ?client, "redis: connected");
        Ok(client)
    }

    /// Builds the client without touching the network: connections open on
    /// first use. For hosts that must start while Redis is down.
    ///
    /// # Errors
    /// [`Error::Config`] for a configuration this client cannot use (none
    /// or several of url / sentinel / cluster, a URL redis-rs refuses, TLS
    /// without the `tls` feature).
    pub fn lazy(cfg: &RedisConfig, key_space: KeySpace) -> Result<Self> {
        let (mode, manager, targets) = Manager::from_config(cfg)?;
        let pool_size = usize::try_from(cfg.pool_size.max(1)).unwrap_or(usize::MAX);
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .timeouts(Timeouts {
                wait: Some(cfg.pool_timeout),
                create: Some(cfg.connect_timeout),
                recycle: Some(cfg.response_timeout),
            })
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::config("reliability.redis", e.to_string()))?;
        let inner = Arc::new(Inner {
            shared: RwLock::new(None),
            connects: tokio::sync::watch::Sender::new(Connects::default()),
            generation: AtomicU64::new(0),
            pool,
            key_space,
            mode,
            targets,
            db: cfg.database()?,
            pool_timeout: cfg.pool_timeout,
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
            failover: AtomicBool::new(false),
            replies: AtomicU64::new(0),
            reply_generation: AtomicU64::new(0),
            scripts: std::sync::Mutex::default(),
            policy: crate::policy::PolicyCache::default(),
            on_evicting_policy: cfg.on_evicting_policy,
        });
        if let Some(s) = &cfg.sentinel {
            // Without a runtime (a client built outside tokio) there is no
            // watcher; READONLY still drops stale connections.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let field = "reliability.redis.sentinel.urls";
                let clients = s
                    .urls
                    .iter()
                    .map(|u| {
                        if u.is_tls() {
                            tls_client(connection_info(u, field)?, cfg, field)
                        } else {
                            Client::open(u.expose()).map_err(|e| config_error(field, &e))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                handle.spawn(watch_sentinels(
                    Arc::downgrade(&inner),
                    clients,
                    s.master_name.clone(),
                    cfg.response_timeout,
                ));
            }
        }
        Ok(Self {
            inner,
            clock_override: None,
        })
    }

    /// **Tests only.** The same client (sharing its pool) whose backends
    /// pass `clock`'s time to their scripts instead of reading Redis
    /// `TIME`, so a [`ManualClock`](reliability_core::ManualClock) drives
    /// lease expiry and rate limits. Physical key expiry (`PEXPIRE`) then
    /// gets a generous margin, because real time and the override diverge.
    /// Never set this in production: replicas with different clocks would
    /// disagree (spring-cloud-gateway#1688 let twice the burst through).
    #[must_use]
    pub fn with_clock_override(mut self, clock: SharedClock) -> Self {
        self.clock_override = Some(clock);
        self
    }

    /// The test clock override, if any (see
    /// [`with_clock_override`](Self::with_clock_override)).
    pub fn clock_override(&self) -> Option<&SharedClock> {
        self.clock_override.as_ref()
    }

    /// The key space every key of this client's backends lives in.
    pub fn key_space(&self) -> &KeySpace {
        &self.inner.key_space
    }

    /// How the client reaches Redis.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// What the idempotency store and the rate limiter do on a server
    /// whose `maxmemory-policy` may evict keys (`redis.onEvictingPolicy`).
    pub fn on_evicting_policy(&self) -> OnEvictingPolicy {
        self.inner.on_evicting_policy
    }

    pub(crate) fn policy_cache(&self) -> &crate::policy::PolicyCache {
        &self.inner.policy
    }

    /// Registers scripts to load (`SCRIPT LOAD`) on every new connection,
    /// in the background connect, and now on the open one. Otherwise the
    /// first call of each script pays `NOSCRIPT` and a load: three round
    /// trips, which a slow link (80 ms each way) turns into more than a
    /// caller's deadline. The backends register theirs when built.
    pub fn preload(&self, scripts: &[&Script]) {
        let added: Vec<Script> = {
            let mut known = self.inner.scripts.lock().unwrap_or_else(|p| p.into_inner());
            let mut added = Vec::new();
            for s in scripts {
                if !known.iter().any(|k| k.get_hash() == s.get_hash()) {
                    known.push((*s).clone());
                    added.push((*s).clone());
                }
            }
            added
        };
        let open = self.inner.current();
        if let (Some(shared), false, Ok(rt)) = (
            open,
            added.is_empty(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(load_scripts(
                shared.conn,
                added,
                self.inner.response_timeout,
            ));
        }
    }

    /// The bound of one command (the configured response timeout).
    pub fn response_timeout(&self) -> Duration {
        self.inner.response_timeout
    }

    /// The longest one call can take: checkout (pool wait, connect, idle
    /// check) plus the command.
    pub fn deadline(&self) -> Duration {
        let i = &self.inner;
        i.pool_timeout + i.connect_timeout + i.response_timeout * 2
    }

    /// Runs `script` with `keys` and `args`: `EVALSHA`, loading the script
    /// on `NOSCRIPT`, within the deadline, errors mapped. In cluster mode
    /// all keys must hash to one slot.
    ///
    /// # Errors
    /// Unavailable errors and [`Error::Timeout`] when Redis cannot answer in
    /// time; [`Error::WrongType`] when a key holds another type;
    /// [`Error::Backend`] for a script error.
    pub async fn invoke(
        &self,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<Value> {
        let cmd = evalsha(script, keys, args);
        let context = keys.first().map_or("script", String::as_str);
        self.eval(script, &cmd, context).await
    }

    /// Runs a prepared `EVALSHA` of `script` (see `script::evalsha`)
    /// on the shared connection, loading the script on `NOSCRIPT`.
    pub(crate) async fn eval(&self, script: &Script, cmd: &Cmd, context: &str) -> Result<Value> {
        let (generation, mut conn) = self.shared(context).await?;
        let run = async {
            match cmd.query_async::<Value>(&mut conn).await {
                Err(e) if is_noscript(&e) => {
                    script.load_async(&mut conn).await?;
                    cmd.query_async::<Value>(&mut conn).await
                }
                other => other,
            }
        };
        let call = InFlight::new(&self.inner, generation);
        let result = self.finish(context, Some(generation), run).await;
        call.done();
        result
    }

    /// Runs one plain command within the deadline, errors mapped. In
    /// cluster mode only single-key (or keyless) commands are routed.
    ///
    /// # Errors
    /// As [`invoke`](Self::invoke).
    pub async fn query(&self, cmd: &Cmd) -> Result<Value> {
        let context = "command";
        let (generation, mut conn) = self.shared(context).await?;
        let call = InFlight::new(&self.inner, generation);
        let result = self
            .finish(
                context,
                Some(generation),
                cmd.query_async::<Value>(&mut conn),
            )
            .await;
        call.done();
        result
    }

    /// Runs `script` and then `WAIT replicas timeout` on the same
    /// connection, so the `WAIT` covers the script's writes. Returns the
    /// script's reply and the number of replicas that acknowledged. The
    /// command part is bounded by `timeout` plus the response timeout.
    /// Runs on an exclusive pooled connection (`WAIT` blocks it), not on
    /// the shared one. In cluster mode, or with `replicas` 0, there is no
    /// `WAIT`: the script runs on the shared connection and 0 replicas
    /// acknowledged.
    ///
    /// # Errors
    /// As [`invoke`](Self::invoke).
    pub async fn invoke_replicated(
        &self,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
        replicas: u32,
        timeout: Duration,
    ) -> Result<(Value, u32)> {
        let cmd = evalsha(script, keys, args);
        let context = keys.first().map_or("script", String::as_str);
        if self.inner.mode == Mode::Cluster || replicas == 0 {
            // Nothing to wait for: the shared connection will do.
            return Ok((self.eval(script, &cmd, context).await?, 0));
        }
        // Declared before the connection, so it is dropped after it: a
        // dropped call then finds the connection back in the pool.
        let call = InFlight::pooled(&self.inner);
        let mut conn = self.checkout(context).await?;
        let run = async {
            match cmd.query_async::<Value>(&mut *conn).await {
                Err(e) if is_noscript(&e) => {
                    script.load_async(&mut *conn).await?;
                    cmd.query_async::<Value>(&mut *conn).await
                }
                other => other,
            }
        };
        let value = match self.finish(context, None, run).await {
            Ok(v) => v,
            Err(e) => {
                if e.is_unavailable() {
                    drop(Object::take(conn));
                }
                return Err(e);
            }
        };
        let acked = self.wait_on(conn, replicas, timeout).await;
        call.done();
        Ok((value, acked?))
    }

    /// `WAIT replicas timeout` on one exclusive pooled connection: the
    /// number of replicas that acknowledged the writes sent *over that
    /// connection*. Other calls travel on the shared connection, so this is
    /// no barrier for them; [`invoke_replicated`](Self::invoke_replicated)
    /// pairs a script with its `WAIT` and is the exact form. Not available
    /// in cluster mode (answers 0).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn wait_replicas(&self, replicas: u32, timeout: Duration) -> Result<u32> {
        if self.inner.mode == Mode::Cluster || replicas == 0 {
            return Ok(0);
        }
        let call = InFlight::pooled(&self.inner);
        let conn = self.checkout("WAIT").await?;
        let acked = self.wait_on(conn, replicas, timeout).await;
        call.done();
        acked
    }

    async fn wait_on(
        &self,
        mut conn: Object<Manager>,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32> {
        if matches!(*conn, Conn::Cluster(_)) || replicas == 0 {
            return Ok(0);
        }
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(ms);
        let after = timeout + self.inner.response_timeout;
        let value = match tokio::time::timeout(after, cmd.query_async::<Value>(&mut *conn)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let (err, disposition) = error::map(&e, "WAIT");
                if disposition == Disposition::Reconnect {
                    drop(Object::take(conn));
                }
                return Err(self.dispose(err, disposition, None));
            }
            Err(_) => {
                drop(Object::take(conn));
                return Err(self.dispose(error::timeout(after), Disposition::Reconnect, None));
            }
        };
        match value {
            Value::Int(n) => Ok(u32::try_from(n).unwrap_or(0)),
            other => Err(error::unexpected("WAIT", other)),
        }
    }

    /// `PING`: `Ok` when a server answers.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn ping(&self) -> Result<()> {
        match self.query(&redis::cmd("PING")).await? {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            Value::BulkString(b) if b == b"PONG" => Ok(()),
            other => Err(error::unexpected("PING", other)),
        }
    }

    /// `ROLE` == master: the health probe behind Sentinel, where a pooled
    /// connection may point at a demoted master. In cluster mode the
    /// cluster client routes writes to masters itself, so this is a `PING`
    /// that answers `true`.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn is_master(&self) -> Result<bool> {
        if self.inner.mode == Mode::Cluster {
            self.ping().await?;
            return Ok(true);
        }
        match self.query(&redis::cmd("ROLE")).await? {
            Value::Array(items) => match items.first() {
                Some(Value::BulkString(b)) => Ok(b == b"master"),
                Some(Value::SimpleString(s)) => Ok(s == "master"),
                other => Err(error::unexpected("ROLE", other)),
            },
            other => Err(error::unexpected("ROLE", other)),
        }
    }

    /// The server's clock (`TIME`) in microseconds since the epoch.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn server_time_us(&self) -> Result<u64> {
        let v = self.query(&redis::cmd("TIME")).await?;
        let parse = |v: &Value| -> Option<u64> {
            match v {
                Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                Value::Int(i) => u64::try_from(*i).ok(),
                _ => None,
            }
        };
        match &v {
            Value::Array(items) if items.len() == 2 => match (parse(&items[0]), parse(&items[1])) {
                (Some(s), Some(us)) => Ok(s * 1_000_000 + us),
                _ => Err(error::unexpected("TIME", &v)),
            },
            _ => Err(error::unexpected("TIME", &v)),
        }
    }

    /// Unavailable while the Sentinel watcher sees a failover in progress.
    fn check_failover(&self, context: &str) -> Result<()> {
        if self.inner.failover.load(Ordering::Acquire) {
            return Err(Error::unavailable(
                error::BACKEND,
                UnavailableReason::MasterDown,
                format!("{context}: Sentinel failover in progress"),
            ));
        }
        Ok(())
    }

    /// A handle of the shared connection (and its generation), opening it
    /// when there is none: a background task connects (see the module
    /// docs), callers wait for it, at most `poolTimeout` + `connectTimeout`.
    async fn shared(&self, context: &str) -> Result<(u64, Conn)> {
        self.check_failover(context)?;
        if let Some(s) = self.inner.current() {
            return Ok((s.generation, s.conn));
        }
        let i = &self.inner;
        let bound = i.pool_timeout + i.connect_timeout;
        let mut connects = i.connects.subscribe();
        let ends = start_connect(&self.inner);
        let wait = async {
            loop {
                if let Some(s) = i.current() {
                    return Ok(s);
                }
                if let Some(failure) = connects.borrow_and_update().ended(ends) {
                    return Err(failure.error(context));
                }
                if connects.changed().await.is_err() {
                    return Err(error::timeout(bound));
                }
            }
        };
        match tokio::time::timeout(bound, wait).await {
            Ok(Ok(s)) => {
                // A failover may have started while we connected.
                self.check_failover(context)?;
                Ok((s.generation, s.conn))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(error::timeout(bound)),
        }
    }

    /// Checks an exclusive connection out of the pool (for `WAIT`).
    async fn checkout(&self, context: &str) -> Result<Object<Manager>> {
        self.check_failover(context)?;
        let i = &self.inner;
        // The pool's own timeouts bound each phase; this timer is the belt.
        let bound = i.pool_timeout + i.connect_timeout + i.response_timeout;
        match tokio::time::timeout(bound, i.pool.get()).await {
            Ok(Ok(obj)) => Ok(obj),
            Ok(Err(e)) => {
                let (err, disposition) = error::pool(e, context);
                Err(self.dispose(err, disposition, None))
            }
            Err(_) => Err(error::timeout(bound)),
        }
    }

    /// Runs a command future under the response timeout and maps its
    /// error; `generation` names the shared connection it ran on.
    async fn finish<T>(
        &self,
        context: &str,
        generation: Option<u64>,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Result<T> {
        let after = self.inner.response_timeout;
        match tokio::time::timeout(after, fut).await {
            Ok(Ok(v)) => {
                self.inner.replied(generation);
                Ok(v)
            }
            Ok(Err(e)) => {
                let (err, disposition) = error::map(&e, context);
                if disposition == Disposition::Keep {
                    self.inner.replied(generation);
                }
                Err(self.dispose(err, disposition, generation))
            }
            Err(_) => {
                // The connection may be stuck behind an unanswered reply.
                Err(self.dispose(error::timeout(after), Disposition::Reconnect, generation))
            }
        }
    }

    /// See [`Inner::dispose`].
    fn dispose(&self, err: Error, disposition: Disposition, generation: Option<u64>) -> Error {
        self.inner.dispose(err, disposition, generation)
    }
}

impl Inner {
    /// On [`Disposition::Reconnect`] drops the shared connection (when it is
    /// still generation `generation`; any one for `None`) and the idle
    /// pooled ones.
    fn dispose(&self, err: Error, disposition: Disposition, generation: Option<u64>) -> Error {
        // A cluster connection reconnects its nodes and refreshes its slot
        // map itself; rebuilding it would only add a connect to every node
        // (one of which may hang) to the next call.
        if disposition == Disposition::Reconnect && self.mode != Mode::Cluster {
            let shared = self.drop_shared(generation);
            let pooled = self.pool.retain(|_, _| false).removed.len();
            if shared || pooled > 0 {
                tracing::warn!(
                    error = %err,
                    dropped_shared_connection = shared,
                    dropped_pooled_connections = pooled,
                    "redis: dropping connections after an error"
                );
            }
        }
        err
    }

    /// A reply came on shared connection `generation` (none: a pooled one).
    fn replied(&self, generation: Option<u64>) {
        if let Some(g) = generation {
            self.reply_generation.store(g, Ordering::Relaxed);
            self.replies.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether shared connection `generation` answered a call after the
    /// reply count was `seen`.
    fn answered_since(&self, generation: u64, seen: u64) -> bool {
        self.reply_generation.load(Ordering::Relaxed) == generation
            && self.replies.load(Ordering::Relaxed) > seen
    }

    fn current(&self) -> Option<Shared> {
        self.shared
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Drops the shared connection if it is generation `generation` (any
    /// for `None`); true if one was dropped.
    fn drop_shared(&self, generation: Option<u64>) -> bool {
        let mut slot = self.shared.write().unwrap_or_else(|p| p.into_inner());
        let matches = slot
            .as_ref()
            .is_some_and(|s| generation.is_none_or(|g| g == s.generation));
        if matches {
            *slot = None;
        }
        matches
    }
}

/// The background connects of one client.
#[derive(Debug, Clone, Default)]
struct Connects {
    /// One is running now.
    running: bool,
    /// How many have ended.
    ended: u64,
    /// How the last one failed (`None`: it connected).
    failure: Option<Failure>,
}

impl Connects {
    /// Once connect number `n` ended without a connection: why.
    fn ended(&self, n: u64) -> Option<Failure> {
        if self.ended < n {
            return None;
        }
        Some(self.failure.clone().unwrap_or_else(|| Failure {
            reason: Some(UnavailableReason::Connection),
            message: "the connection closed right after it opened".into(),
        }))
    }
}

/// A failed connect, kept to answer every caller that waited for it.
#[derive(Debug, Clone)]
struct Failure {
    /// The unavailable reason; `None` for a deployment error (failed
    /// authentication, a refused certificate).
    reason: Option<UnavailableReason>,
    message: String,
}

impl Failure {
    fn of(err: &Error) -> Self {
        match err {
            Error::Unavailable {
                reason, message, ..
            } => Failure {
                reason: Some(*reason),
                message: message.clone(),
            },
            Error::Backend { message, .. } => Failure {
                reason: None,
                message: message.clone(),
            },
            other => Failure {
                reason: other.unavailable_reason(),
                message: other.to_string(),
            },
        }
    }

    fn error(&self, context: &str) -> Error {
        let message = format!("{context}: {}", self.message);
        match self.reason {
            Some(reason) => Error::unavailable(error::BACKEND, reason, message),
            None => Error::Backend {
                backend: error::BACKEND,
                message,
                source: None,
            },
        }
    }
}

/// Starts a background connect unless one runs; returns the number of the
/// connect whose end a caller waits for.
fn start_connect(inner: &Arc<Inner>) -> u64 {
    let mut spawn = false;
    let mut ends = 0;
    inner.connects.send_modify(|c| {
        spawn = !c.running;
        c.running = true;
        ends = c.ended + 1;
    });
    if spawn {
        tokio::spawn(connect(Arc::clone(inner)));
    }
    ends
}

/// One connect, bounded by the connect timeout whoever waits for it: on
/// success the shared connection, else the failure for the waiters.
async fn connect(inner: Arc<Inner>) {
    let created = tokio::time::timeout(
        inner.connect_timeout,
        deadpool::managed::Manager::create(inner.pool.manager()),
    )
    .await;
    let failure = match created {
        Ok(Ok(conn)) => {
            let scripts = inner
                .scripts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            load_scripts(conn.clone(), scripts, inner.connect_timeout).await;
            let shared = Shared {
                generation: inner.generation.fetch_add(1, Ordering::AcqRel) + 1,
                conn,
            };
            *inner.shared.write().unwrap_or_else(|p| p.into_inner()) = Some(shared);
            None
        }
        Ok(Err(e)) => {
            let (err, disposition) = error::map(&e, "connect");
            Some(Failure::of(&inner.dispose(err, disposition, None)))
        }
        Err(_) => Some(Failure {
            reason: Some(UnavailableReason::Timeout),
            message: format!(
                "no connection within the connect timeout ({:?})",
                inner.connect_timeout
            ),
        }),
    };
    inner.connects.send_modify(|c| {
        c.running = false;
        c.ended += 1;
        c.failure = failure;
    });
}

/// Loads `scripts` on `conn` (pipelined: one round trip), within `bound`.
/// Best effort: a script that is not loaded is loaded on its first call.
/// Not on a cluster connection (each node holds its own scripts, and the
/// cluster client loads them on `NOSCRIPT`).
async fn load_scripts(conn: Conn, scripts: Vec<Script>, bound: Duration) {
    if scripts.is_empty() || matches!(conn, Conn::Cluster(_)) {
        return;
    }
    let mut loads = tokio::task::JoinSet::new();
    for script in scripts {
        let mut conn = conn.clone();
        loads.spawn(async move { script.load_async(&mut conn).await });
    }
    let all = async { while loads.join_next().await.is_some() {} };
    if tokio::time::timeout(bound, all).await.is_err() {
        tracing::debug!("redis: loading the scripts on a new connection timed out");
    }
}

/// A call on shared connection `generation` (`None`: on a pooled one):
/// dropped before [`done`] (its caller's deadline passed), it drops that
/// connection, which may never answer again (see the module docs), unless
/// the connection answered another call meanwhile: a slow link is not a
/// dead one, and replacing it would only add a connect to the next calls.
///
/// [`done`]: InFlight::done
struct InFlight<'a> {
    inner: &'a Inner,
    generation: Option<u64>,
    /// The reply count when the call started.
    replies: u64,
    finished: bool,
}

impl<'a> InFlight<'a> {
    fn new(inner: &'a Inner, generation: u64) -> Self {
        Self {
            inner,
            generation: Some(generation),
            replies: inner.replies.load(Ordering::Relaxed),
            finished: false,
        }
    }

    /// A call on a pooled connection: dropped early, it empties the pool's
    /// idle connections, its own among them once it went back.
    fn pooled(inner: &'a Inner) -> Self {
        Self {
            inner,
            generation: None,
            replies: 0,
            finished: false,
        }
    }

    fn done(mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // A cluster connection times out its own calls and heals itself.
        if self.finished || self.inner.mode == Mode::Cluster {
            return;
        }
        let dropped = match self.generation {
            Some(g) if self.inner.answered_since(g, self.replies) => false,
            Some(g) => self.inner.drop_shared(Some(g)),
            None => !self.inner.pool.retain(|_, _| false).removed.is_empty(),
        };
        if dropped {
            tracing::warn!(
                generation = self.generation,
                "redis: a call was dropped before its reply (its caller's deadline); \
                 dropping its connection"
            );
        }
    }
}

/// `EVALSHA sha numkeys keys... args...` of `script`.
fn evalsha(script: &Script, keys: &[String], args: &[Vec<u8>]) -> Cmd {
    let mut cmd = crate::script::evalsha(script, keys.len(), keys.len() + args.len());
    for k in keys {
        cmd.arg(k.as_str());
    }
    for a in args {
        cmd.arg(a.as_slice());
    }
    cmd
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// How often a Sentinel client asks the sentinels about the master.
const SENTINEL_POLL: Duration = Duration::from_millis(50);

/// Behind Sentinel, pooled connections are never re-checked (deadpool#372):
/// after a failover they keep writing to the demoted master, which accepts
/// writes until the sentinels convert it to a replica (seconds later) —
/// writes that are then lost. Measured here: a manual failover took ~1.1 s
/// from `SENTINEL FAILOVER` to `+switch-master`, and ~5,000 acknowledged
/// writes of that window were gone afterwards.
///
/// This task asks the sentinels (`SENTINEL MASTER`) every
/// [`SENTINEL_POLL`]. From the start of a failover until the sentinels name
/// the new master it holds every call (they answer unavailable,
/// `MasterDown`: a fallback takes them) and drops the pooled connections;
/// when the master's address changes it drops them again, so the next call
/// connects to the new master (while the sentinels still reconfigure the
/// replicas). The sentinels'
/// state machine ticks every 100 ms and promotes the replica a few ticks
/// after the failover starts, so polling at 50 ms sees the failover before
/// the promotion. It stops when the client is dropped.
async fn watch_sentinels(
    inner: std::sync::Weak<Inner>,
    sentinels: Vec<Client>,
    master_name: String,
    timeout: Duration,
) {
    let mut conns: Vec<Option<MultiplexedConnection>> = vec![None; sentinels.len()];
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut known: Option<(String, String)> = None;
    // The master's address when the current failover was first seen.
    let mut failover_from: Option<(String, String)> = None;
    loop {
        tokio::time::sleep(SENTINEL_POLL).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut answer = None;
        for (client, slot) in sentinels.iter().zip(conns.iter_mut()) {
            if slot.is_none() {
                *slot = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .ok();
            }
            let Some(conn) = slot.as_mut() else { continue };
            let reply = redis::cmd("SENTINEL")
                .arg("MASTER")
                .arg(&master_name)
                .query_async::<std::collections::HashMap<String, String>>(conn)
                .await;
            match reply {
                Ok(fields) => {
                    answer = Some(fields);
                    break;
                }
                Err(_) => *slot = None,
            }
        }
        let Some(fields) = answer else { continue };
        let flags = fields.get("flags").map(String::as_str).unwrap_or("");
        let in_failover = flags.split(',').any(|f| f.starts_with("failover"));
        let addr = (
            fields.get("ip").cloned().unwrap_or_default(),
            fields.get("port").cloned().unwrap_or_default(),
        );
        // Hold calls from the start of a failover until the sentinels name
        // another master: the sentinels keep the failover flag while they
        // reconfigure the replicas (seconds), but writes to the new master
        // are safe as soon as it is named.
        let holding = if in_failover {
            let from =
                failover_from.get_or_insert_with(|| known.clone().unwrap_or_else(|| addr.clone()));
            *from == addr
        } else {
            failover_from = None;
            false
        };
        let was_holding = inner.failover.swap(holding, Ordering::AcqRel);
        let moved = known.as_ref().is_some_and(|k| *k != addr);
        if (holding && !was_holding) || moved {
            inner.drop_shared(None);
            let dropped = inner.pool.retain(|_, _| false).removed.len();
            tracing::warn!(
                master = %format!("{}:{}", addr.0, addr.1),
                failover_in_progress = in_failover,
                dropped_pooled_connections = dropped,
                "redis: sentinel failover; dropping the shared and pooled connections"
            );
        }
        known = Some(addr);
    }
}

/// A pooled connection: multiplexed (standalone, Sentinel) or cluster.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Creates connections for the pool; recycling is free for recently used
/// connections (a broken one is found by its next call, which drops every
/// idle connection).
struct Manager {
    kind: Kind,
}

enum Kind {
    Standalone {
        client: Client,
        config: AsyncConnectionConfig,
    },
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        config: AsyncConnectionConfig,
    },
    Cluster {
        client: ClusterClient,
    },
}

impl Manager {
    fn from_config(cfg: &RedisConfig) -> Result<(Mode, Manager, Vec<String>)> {
        // No response timeout of redis-rs: every command already runs under
        // our own timer (one timer per call, not two), and `WAIT` may
        // rightly block longer than the response timeout.
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(None);
        // The `db` field or else the URL's path: the one database the
        // configuration names (validation refuses two that differ).
        let db = i64::from(cfg.database()?);
        match (&cfg.url, &cfg.sentinel, &cfg.cluster) {
            (Some(url), None, None) => {
                let info = connection_info(url, "reliability.redis.url")?;
                let mut settings = info.redis_settings().clone().set_db(db);
                if let Some(u) = &cfg.username {
                    settings = settings.set_username(u);
                }
                if let Some(p) = &cfg.password {
                    settings = settings.set_password(p.expose());
                }
                let info = info.set_redis_settings(settings);
                let client = if url.is_tls() {
                    tls_client(info, cfg, "reliability.redis.url")?
                } else {
                    Client::open(info).map_err(|e| config_error("reliability.redis.url", &e))?
                };
                Ok((
                    Mode::Standalone,
                    Manager {
                        kind: Kind::Standalone {
                            client,
                            config: conn_config,
                        },
                    },
                    vec![url.redacted()],
                ))
            }
            (None, Some(s), None) => {
                let field = "reliability.redis.sentinel.urls";
                if s.urls.is_empty() {
                    return Err(Error::config(field, "must hold at least one sentinel"));
                }
                let mut addrs = Vec::with_capacity(s.urls.len());
                let mut sentinel_auth: Option<(Option<String>, Option<String>)> = None;
                for u in &s.urls {
                    let info = connection_info(u, field)?;
                    let r = info.redis_settings();
                    if sentinel_auth.is_none() && (r.username().is_some() || r.password().is_some())
                    {
                        sentinel_auth = Some((
                            r.username().map(str::to_string),
                            r.password().map(str::to_string),
                        ));
                    }
                    addrs.push(info.addr().clone());
                }
                let mut b = SentinelClientBuilder::new(
                    addrs,
                    s.master_name.clone(),
                    SentinelServerType::Master,
                )
                .map_err(|e| config_error(field, &e))?
                .set_client_to_redis_db(db);
                if let Some(u) = &cfg.username {
                    b = b.set_client_to_redis_username(u);
                }
                if let Some(p) = &cfg.password {
                    b = b.set_client_to_redis_password(p.expose());
                }
                if let Some((user, pass)) = sentinel_auth {
                    if let Some(u) = user {
                        b = b.set_client_to_sentinel_username(u);
                    }
                    if let Some(p) = pass {
                        b = b.set_client_to_sentinel_password(p);
                    }
                }
                if all_tls(&s.urls, field)? {
                    // TLS to the sentinels and to the master they name.
                    #[cfg(feature = "tls")]
                    {
                        use redis::TlsMode;
                        let certs = tls_certificates(cfg)?;
                        b = b
                            .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                            .set_client_to_sentinel_certificates(certs.clone())
                            .set_client_to_redis_tls_mode(TlsMode::Secure)
                            .set_client_to_redis_certificates(certs);
                    }
                    #[cfg(not(feature = "tls"))]
                    return Err(no_tls_feature(field));
                }
                let client = b.build().map_err(|e| config_error(field, &e))?;
                Ok((
                    Mode::Sentinel,
                    Manager {
                        kind: Kind::Sentinel {
                            client: tokio::sync::Mutex::new(client),
                            config: conn_config,
                        },
                    },
                    s.urls.iter().map(RedisUrl::redacted).collect(),
                ))
            }
            (None, None, Some(c)) => {
                let field = "reliability.redis.cluster.urls";
                if c.urls.is_empty() {
                    return Err(Error::config(field, "must hold at least one node"));
                }
                if cfg.database()? != 0 {
                    return Err(Error::config(
                        "reliability.redis.db",
                        "must be 0 for a cluster",
                    ));
                }
                let infos = c
                    .urls
                    .iter()
                    .map(|u| connection_info(u, field))
                    .collect::<Result<Vec<_>>>()?;
                let mut b = ClusterClientBuilder::new(infos)
                    .connection_timeout(cfg.connect_timeout)
                    .response_timeout(cfg.response_timeout)
                    .retries(CLUSTER_RETRIES);
                if let Some(u) = &cfg.username {
                    b = b.username(u);
                }
                if let Some(p) = &cfg.password {
                    b = b.password(p.expose());
                }
                if all_tls(&c.urls, field)? {
                    #[cfg(feature = "tls")]
                    {
                        b = b.tls(redis::TlsMode::Secure).certs(tls_certificates(cfg)?);
                    }
                    #[cfg(not(feature = "tls"))]
                    return Err(no_tls_feature(field));
                }
                let client = b.build().map_err(|e| config_error(field, &e))?;
                Ok((
                    Mode::Cluster,
                    Manager {
                        kind: Kind::Cluster { client },
                    },
                    c.urls.iter().map(RedisUrl::redacted).collect(),
                ))
            }
            _ => Err(Error::config(
                "reliability.redis",
                "set exactly one of url, sentinel, cluster",
            )),
        }
    }
}

/// A `rediss://` client of one server (`field` names its URL's setting).
#[cfg(feature = "tls")]
fn tls_client(info: redis::ConnectionInfo, cfg: &RedisConfig, field: &str) -> Result<Client> {
    Client::build_with_tls(info, tls_certificates(cfg)?).map_err(|e| config_error(field, &e))
}

/// The TLS files of `reliability.redis.tls`, read and checked: the CA of
/// `caFile` (else the system roots) and, for mutual TLS, `certFile` /
/// `keyFile`.
#[cfg(feature = "tls")]
fn tls_certificates(cfg: &RedisConfig) -> Result<redis::TlsCertificates> {
    use redis::{ClientTlsConfig, TlsCertificates};
    // redis-rs enables rustls without a crypto provider; install ring's
    // unless the host installed one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::config(
                format!("reliability.redis.tls.{field}"),
                format!("cannot read {}: {e}", path.display()),
            )
        })
    };
    let tls = cfg.tls.clone().unwrap_or_default();
    if tls.insecure_skip_verify {
        return Err(Error::config(
            "reliability.redis.tls.insecureSkipVerify",
            "is not supported; give the server's CA as caFile",
        ));
    }
    let root_cert = tls
        .ca_file
        .as_deref()
        .map(|p| read("caFile", p).and_then(|pem| check_ca(p, pem)))
        .transpose()?;
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => Some(ClientTlsConfig {
            client_cert: read("certFile", c).and_then(|pem| check_certs("certFile", c, pem))?,
            client_key: read("keyFile", k).and_then(|pem| check_key(k, pem))?,
        }),
        (None, None) => None,
        _ => {
            return Err(Error::config(
                "reliability.redis.tls",
                "certFile and keyFile go together",
            ))
        }
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// `caFile` holds PEM certificates rustls accepts as trust anchors.
/// redis-rs skips text that is not PEM, so without this check a wrong
/// file would only show as a failed handshake (an outage) at first use.
#[cfg(feature = "tls")]
fn check_ca(path: &std::path::Path, pem: Vec<u8>) -> Result<Vec<u8>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = check_certs("caFile", path, pem)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        roots.add(cert).map_err(|e| {
            Error::config(
                "reliability.redis.tls.caFile",
                format!("{}: not a usable CA certificate: {e}", path.display()),
            )
        })?;
    }
    Ok(pem)
}

/// `field` holds at least one PEM certificate, all of them well-formed.
#[cfg(feature = "tls")]
fn check_certs(field: &str, path: &std::path::Path, pem: Vec<u8>) -> Result<Vec<u8>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let field = format!("reliability.redis.tls.{field}");
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| {
            Error::config(
                &field,
                format!("{}: unreadable PEM certificate: {e}", path.display()),
            )
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::config(
            field,
            format!(
                "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(pem)
}

/// `keyFile` holds a PEM private key rustls can sign with.
#[cfg(feature = "tls")]
fn check_key(path: &std::path::Path, pem: Vec<u8>) -> Result<Vec<u8>> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let bad = |e: String| {
        Error::config(
            "reliability.redis.tls.keyFile",
            format!("{}: {e}", path.display()),
        )
    };
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| bad(format!("holds no usable PEM private key: {e}")))?;
    rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| bad(format!("unsupported private key: {e}")))?;
    Ok(pem)
}

#[cfg(not(feature = "tls"))]
fn tls_client(_: redis::ConnectionInfo, _: &RedisConfig, field: &str) -> Result<Client> {
    Err(no_tls_feature(field))
}

#[cfg(not(feature = "tls"))]
fn no_tls_feature(field: &str) -> Error {
    Error::config(
        field,
        "rediss:// needs the `tls` feature of crate reliability-redis",
    )
}

/// Whether `urls` are `rediss://`: all or none.
fn all_tls(urls: &[RedisUrl], field: &str) -> Result<bool> {
    let tls = urls.iter().filter(|u| u.is_tls()).count();
    if tls != 0 && tls != urls.len() {
        return Err(Error::config(
            field,
            "mixes rediss:// and redis:// URLs; use one scheme for all",
        ));
    }
    Ok(tls != 0)
}

fn connection_info(url: &RedisUrl, field: &str) -> Result<redis::ConnectionInfo> {
    url.expose()
        .into_connection_info()
        .map_err(|e| config_error(field, &e))
}

/// The error of a connection whose `SELECT` the server refused: the
/// database does not exist there (its `databases` setting is lower), a
/// configuration error naming `db`; any other error as it is.
fn missing_database(e: Error, db: u32) -> Error {
    match &e {
        Error::Backend { message, .. } if message.contains("DB index is out of range") => {
            Error::config(
                "reliability.redis.db",
                format!("database {db} does not exist on the server (see its `databases` setting)"),
            )
        }
        _ => e,
    }
}

fn config_error(field: &str, e: &RedisError) -> Error {
    Error::config(field, reliability_core::status::redact(&e.to_string()))
}

impl deadpool::managed::Manager for Manager {
    type Type = Conn;
    type Error = RedisError;

    async fn create(&self) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Standalone { client, config } => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Conn::Single),
            Kind::Sentinel { client, config } => {
                let mut client = client.lock().await;
                client
                    .get_async_connection_with_config(config)
                    .await
                    .map(Conn::Single)
            }
            Kind::Cluster { client } => client.get_async_connection().await.map(Conn::Cluster),
        }
    }

    async fn recycle(&self, conn: &mut Conn, metrics: &Metrics) -> RecycleResult<RedisError> {
        if matches!(conn, Conn::Cluster(_)) || metrics.last_used() < IDLE_CHECK {
            return Ok(());
        }
        let pong: String = redis::cmd("PING").query_async(conn).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(deadpool::managed::RecycleError::message(
                "unexpected PING reply",
            ))
        }
    }
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Standalone { .. } => "standalone",
            Kind::Sentinel { .. } => "sentinel",
            Kind::Cluster { .. } => "cluster",
        };
        f.debug_struct("Manager").field("kind", &kind).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reliability_core::config::Secret;

    #[test]
    fn debug_hides_the_password() {
        let mut cfg =
            RedisConfig::standalone(RedisUrl::new("redis://app:hunter2@127.0.0.1:1/0").unwrap());
        cfg.password = Some(Secret::new("s3cret-pass"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let c = RedisClient::lazy(&cfg, KeySpace::new("p", "n").unwrap()).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("127.0.0.1"), "{dbg}");
    }
}
