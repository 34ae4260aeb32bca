//! A harness that runs real Redis processes for tests: a standalone
//! [`RedisServer`], a [`SentinelSet`] (master, replicas, sentinels) and a
//! [`RedisCluster`], each on free loopback ports in temporary directories.
//!
//! ```no_run
//! use reliability_redis::harness::RedisServer;
//!
//! let server = RedisServer::start();
//! println!("{}", server.url()); // redis://127.0.0.1:<free port>
//! // ... run the test ...
//! drop(server); // killed and reaped
//! ```
//!
//! Rules it keeps:
//!
//! - only loopback addresses, never a fixed port: a port is found by
//!   binding `127.0.0.1:0`, and a start that loses the race for it is
//!   retried on another;
//! - persistence off (`save ""`, `appendonly no`) unless asked;
//! - readiness is a `PING` (or cluster / sentinel state) polled with a
//!   deadline, never a fixed sleep;
//! - no orphans: every process is killed and reaped on `Drop`, and each runs
//!   under a tiny watchdog shell that kills it when the test process's end
//!   of a pipe closes — so servers held in a `static` die with the test
//!   binary too, however it exits;
//! - it only ever talks to servers it started.
//!
//! Binaries come from Debian's `redis-server`, `redis-sentinel` and
//! `redis-tools` packages (`scripts/test.sh` installs them); a missing one
//! panics with that advice.
//!
//! The methods panic on failure: this is test code.
#![allow(clippy::missing_panics_doc)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use reliability_core::config::{RedisConfig, RedisUrl, Secret};
use tempfile::TempDir;

/// How long a server may take to answer its first `PING`.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a cluster or Sentinel set may take to settle.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
/// Port races retried before giving up.
const START_ATTEMPTS: usize = 8;

const MISSING: &str = "redis-server not found: run scripts/test.sh, which installs Debian's \
                       redis-server/redis-sentinel/redis-tools";

/// Options of [`RedisServer::start_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ServerOptions {
    /// `requirepass`: clients must `AUTH` with it. With
    /// [`username`](Self::username), that ACL user's password instead.
    pub password: Option<String>,
    /// An ACL user: with [`password`](Self::password) set, the server gets
    /// this user (every key, channel and command allowed) and the `default`
    /// user is turned off, so only `AUTH <user> <password>` gets in.
    /// Replicas authenticate as it; behind Sentinel the sentinels monitor
    /// with it (`sentinel auth-user`/`auth-pass`).
    pub username: Option<String>,
    /// Serve TLS with these PEM files (on the TLS port; the plain port
    /// stays open for the harness's own checks).
    pub tls: Option<TlsFiles>,
    /// Extra `redis.conf` lines, e.g. `"maxmemory-policy allkeys-lru"`.
    pub extra_config: Vec<String>,
    /// Keep the default persistence (`save`, AOF as configured by
    /// `extra_config`) instead of turning it off.
    pub persistence: bool,
}

impl ServerOptions {
    /// No password, no TLS, persistence off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`password`](Self::password).
    #[must_use]
    pub fn password(mut self, p: impl Into<String>) -> Self {
        self.password = Some(p.into());
        self
    }

    /// Sets [`username`](Self::username) and [`password`](Self::password).
    #[must_use]
    pub fn acl_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Sets [`tls`](Self::tls).
    #[must_use]
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Adds one `redis.conf` line.
    #[must_use]
    pub fn config_line(mut self, line: impl Into<String>) -> Self {
        self.extra_config.push(line.into());
        self
    }

    /// Sets [`persistence`](Self::persistence).
    #[must_use]
    pub fn persistence(mut self, on: bool) -> Self {
        self.persistence = on;
        self
    }
}

/// PEM files of a TLS server.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that signed it (also used to check client certificates when
    /// `tls-auth-clients` is on; the harness turns that off).
    pub ca: PathBuf,
}

/// The role a process plays, for its configuration.
#[derive(Debug, Clone)]
enum Role {
    Plain,
    Replica { master_port: u16 },
    ClusterNode,
    Sentinel { text: String },
}

/// One `redis-server` (or `redis-sentinel`) process on a loopback port.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    tls_port: Option<u16>,
    pid: u32,
    watchdog: Option<Watchdog>,
    dir: TempDir,
    opts: ServerOptions,
    role: Role,
}

/// The watchdog shell: it holds the server's pid, and kills the server when
/// its stdin (our pipe) closes.
#[derive(Debug)]
struct Watchdog {
    shell: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    fn stop(mut self) {
        drop(self.stdin.take());
        let _ = self.shell.wait();
    }
}

impl RedisServer {
    /// Starts a standalone server with default options.
    pub fn start() -> Self {
        Self::start_with(ServerOptions::new())
    }

    /// Starts a standalone server with `opts`.
    pub fn start_with(opts: ServerOptions) -> Self {
        Self::spawn(opts, Role::Plain)
    }

    fn spawn(opts: ServerOptions, role: Role) -> Self {
        require_binaries();
        let dir = tempfile::Builder::new()
            .prefix("reliability-redis-")
            .tempdir()
            .expect("create a temporary directory for redis");
        let cluster = matches!(role, Role::ClusterNode);
        let mut server = RedisServer {
            port: 0,
            tls_port: None,
            pid: 0,
            watchdog: None,
            dir,
            opts,
            role,
        };
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port(cluster);
            server.tls_port = server.opts.tls.as_ref().map(|_| free_port(false));
            match server.launch() {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    server.kill_quietly();
                }
            }
        }
        panic!("redis-server did not start after {START_ATTEMPTS} attempts: {last_error}");
    }

    /// Writes the configuration and starts the process; waits for `PING`.
    fn launch(&mut self) -> Result<(), String> {
        let conf = self.write_config();
        let (program, args): (&str, Vec<String>) = match self.role {
            Role::Sentinel { .. } => ("redis-sentinel", vec![conf.display().to_string()]),
            _ => ("redis-server", vec![conf.display().to_string()]),
        };
        let log = self.dir.path().join("redis.log");
        // The watchdog: start the server in the background, print its pid,
        // block on stdin, and kill the server when stdin closes.
        let script = r#"prog="$1"; shift; log="$1"; shift
"$prog" "$@" </dev/null >>"$log" 2>&1 &
pid=$!
echo "$pid"
read _unused
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0"#;
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .arg(&log)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn sh: {e}"))?;
        let stdin = shell.stdin.take();
        let mut out = BufReader::new(shell.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        out.read_line(&mut line)
            .map_err(|e| format!("read pid: {e}"))?;
        self.pid = line
            .trim()
            .parse()
            .map_err(|_| format!("watchdog printed {line:?}, not a pid"))?;
        self.watchdog = Some(Watchdog { shell, stdin });
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(reply) = self.try_cmd(&["PING"]) {
                if reply.is_ok() {
                    return Ok(());
                }
            }
            if !self.is_alive() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(format!("{program} on port {} exited: {tail}", self.port));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{program} on port {} did not answer PING",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The TLS lines of this process's configuration, if it serves TLS.
    fn tls_lines(&self, lines: &mut Vec<String>) {
        let (Some(t), Some(tls_port)) = (&self.opts.tls, self.tls_port) else {
            return;
        };
        lines.push(format!("tls-port {tls_port}"));
        lines.push(format!("tls-cert-file {}", t.cert.display()));
        lines.push(format!("tls-key-file {}", t.key.display()));
        lines.push(format!("tls-ca-cert-file {}", t.ca.display()));
        lines.push("tls-auth-clients no".to_string());
        if matches!(self.role, Role::ClusterNode) {
            // The bus speaks TLS too, and CLUSTER SLOTS asked over TLS
            // answers the nodes' TLS ports.
            lines.push("tls-cluster yes".to_string());
        }
    }

    fn write_config(&self) -> PathBuf {
        let d = self.dir.path();
        let mut lines = vec![
            format!("port {}", self.port),
            "bind 127.0.0.1".to_string(),
            format!("dir {}", d.display()),
            "daemonize no".to_string(),
            "protected-mode yes".to_string(),
        ];
        if let Role::Sentinel { text } = &self.role {
            if let Some(p) = &self.opts.password {
                // The sentinels' own password, which they also use with
                // each other.
                lines.push(format!("requirepass {p}"));
                lines.push(format!("sentinel sentinel-pass {p}"));
            }
            self.tls_lines(&mut lines);
            lines.extend(self.opts.extra_config.iter().cloned());
            lines.push(text.clone());
        } else {
            if !self.opts.persistence {
                lines.push("save \"\"".to_string());
                lines.push("appendonly no".to_string());
            }
            match (&self.opts.username, &self.opts.password) {
                (Some(u), Some(p)) => {
                    lines.push("user default off".to_string());
                    lines.push(format!("user {u} on >{p} ~* &* +@all"));
                    lines.push(format!("masteruser {u}"));
                    lines.push(format!("masterauth {p}"));
                }
                (None, Some(p)) => {
                    lines.push(format!("requirepass {p}"));
                    lines.push(format!("masterauth {p}"));
                }
                _ => {}
            }
            self.tls_lines(&mut lines);
            match &self.role {
                Role::Replica { master_port } => {
                    lines.push(format!("replicaof 127.0.0.1 {master_port}"));
                }
                Role::ClusterNode => {
                    lines.push("cluster-enabled yes".to_string());
                    lines.push("cluster-config-file nodes.conf".to_string());
                    lines.push("cluster-node-timeout 2000".to_string());
                }
                Role::Plain | Role::Sentinel { .. } => {}
            }
            lines.extend(self.opts.extra_config.iter().cloned());
        }
        let path = d.join(match self.role {
            Role::Sentinel { .. } => "sentinel.conf",
            _ => "redis.conf",
        });
        // Sentinel rewrites its file; a restart keeps what it learned.
        if !(matches!(self.role, Role::Sentinel { .. }) && path.exists()) {
            std::fs::write(&path, lines.join("\n") + "\n").expect("write redis.conf");
        }
        path
    }

    /// Whether `port` is this server's plain or TLS port.
    fn serves(&self, port: u16) -> bool {
        self.port == port || self.tls_port == Some(port)
    }

    /// `redis://127.0.0.1:<port>` (no credentials; see [`config`](Self::config)).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:<tls port>` when started with TLS.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}"))
    }

    /// A standalone [`RedisConfig`] for this server, with its password.
    pub fn config(&self) -> RedisConfig {
        let mut cfg = RedisConfig::standalone(RedisUrl::new(self.url()).expect("valid url"));
        cfg.username.clone_from(&self.opts.username);
        cfg.password = self.opts.password.clone().map(Secret::new);
        cfg
    }

    /// The plain TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the server (not of its watchdog).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's directory (its `redis.conf`, log, dumps).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `true` while the process exists (a stopped process is alive).
    pub fn is_alive(&self) -> bool {
        self.pid != 0 && signal("-0", self.pid)
    }

    /// `kill -9`: the server dies at once, as in a crash.
    pub fn kill9(&mut self) {
        self.kill_quietly();
    }

    /// `kill -STOP`: the server hangs (the socket accepts, nothing answers).
    pub fn sigstop(&self) {
        assert!(signal("-STOP", self.pid), "kill -STOP {} failed", self.pid);
    }

    /// `kill -CONT`: a stopped server resumes.
    pub fn sigcont(&self) {
        assert!(signal("-CONT", self.pid), "kill -CONT {} failed", self.pid);
    }

    /// Kills the server (if running) and starts it again on the same port
    /// with the same directory and configuration.
    pub fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.launch() {
                Ok(()) => return,
                // The old socket may linger for a moment.
                Err(e) if Instant::now() > deadline => panic!("restart failed: {e}"),
                Err(_) => {
                    self.kill_quietly();
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Runs one command on this server (authenticating when it has a
    /// password) and returns the reply.
    pub fn cmd(&self, args: &[&str]) -> Resp {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("{:?} on port {}: {e}", args, self.port))
    }

    /// [`cmd`](Self::cmd) without the panic.
    ///
    /// # Errors
    /// An I/O error when the server cannot be reached or answers garbage.
    pub fn try_cmd(&self, args: &[&str]) -> std::io::Result<Resp> {
        resp_cmd(
            self.port,
            self.opts.username.as_deref(),
            self.opts.password.as_deref(),
            args,
        )
    }

    /// Fills the server's memory until a write is refused with `OOM` (it
    /// must run with `maxmemory` and `noeviction`), then lowers `maxmemory`
    /// below what is used, so memory the server frees later (client
    /// buffers) lets no write through. `CONFIG SET maxmemory 0` ends it.
    ///
    /// # Panics
    /// When the server never refuses a write, or refuses it otherwise.
    pub fn fill_to_oom(&self) {
        for (size, what) in [(16 * 1024, "big"), (64, "small")] {
            let value = "f".repeat(size);
            let refused = (0..200_000).any(|i| {
                match self.cmd(&["SET", &format!("filler:{what}:{i}"), &value]) {
                    Resp::Error(e) if e.starts_with("OOM") => true,
                    Resp::Error(e) => panic!("filling: {e}"),
                    _ => false,
                }
            });
            assert!(refused, "the server never reported OOM");
        }
        let used: u64 = self
            .info_field("memory", "used_memory")
            .and_then(|v| v.parse().ok())
            .expect("used_memory");
        let limit = (used / 4 * 3).to_string();
        assert!(self.cmd(&["CONFIG", "SET", "maxmemory", &limit]).is_ok());
    }

    /// The `INFO <section>` field `name`.
    pub fn info_field(&self, section: &str, name: &str) -> Option<String> {
        let text = self.cmd(&["INFO", section]).text()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
    }

    fn kill_quietly(&mut self) {
        if self.pid != 0 {
            let _ = signal("-KILL", self.pid);
        }
        if let Some(w) = self.watchdog.take() {
            // The watchdog reaps the server before it exits.
            w.stop();
        }
        self.pid = 0;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped process cannot die of SIGKILL any slower, but make it
        // runnable anyway so nothing waits on it.
        if self.pid != 0 {
            let _ = signal("-CONT", self.pid);
        }
        self.kill_quietly();
    }
}

fn signal(sig: &str, pid: u32) -> bool {
    Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn require_binaries() {
    for bin in ["redis-server", "redis-sentinel", "redis-cli"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false);
        assert!(found, "{MISSING} ({bin} is missing)");
    }
}

/// A free loopback port; for cluster nodes also its bus port (+10000).
fn free_port(with_bus: bool) -> u16 {
    loop {
        let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        let port = l.local_addr().expect("local addr").port();
        if !with_bus {
            return port;
        }
        if port > 55_000 {
            continue;
        }
        if TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port + 10_000))).is_ok() {
            return port;
        }
    }
}

// ---------------------------------------------------------------------------
// A tiny RESP client for the harness's own checks
// ---------------------------------------------------------------------------

/// A RESP2 reply, as the harness reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`.
    Simple(String),
    /// `-ERR ...`.
    Error(String),
    /// `:42`.
    Int(i64),
    /// `$n` (None for `$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*n` (None for `*-1`).
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// `false` for an error reply.
    pub fn is_ok(&self) -> bool {
        !matches!(self, Resp::Error(_))
    }

    /// The text of a simple or bulk string.
    pub fn text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The items of an array (empty for anything else).
    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(v)) => v,
            _ => &[],
        }
    }
}

fn resp_cmd(
    port: u16,
    user: Option<&str>,
    password: Option<&str>,
    args: &[&str],
) -> std::io::Result<Resp> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    if let Some(p) = password {
        s.write_all(&encode(&match user {
            Some(u) => vec!["AUTH", u, p],
            None => vec!["AUTH", p],
        }))?;
        let reply = read_resp(&mut r)?;
        if !reply.is_ok() {
            return Ok(reply);
        }
    }
    s.write_all(&encode(args))?;
    read_resp(&mut r)
}

/// `url` with `password` added as its password (no user), if any.
fn with_password(url: &str, password: Option<&str>) -> String {
    match password {
        Some(p) => url.replacen("://", &format!("://:{p}@"), 1),
        None => url.to_string(),
    }
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_resp(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    let num = || rest.parse::<i64>().map_err(|_| bad("bad length"));
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Int(num()?),
        "$" => {
            let n = num()?;
            if n < 0 {
                Resp::Bulk(None)
            } else {
                let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0) + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(buf.len() - 2);
                Resp::Bulk(Some(buf))
            }
        }
        "*" => {
            let n = num()?;
            if n < 0 {
                Resp::Array(None)
            } else {
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(read_resp(r)?);
                }
                Resp::Array(Some(v))
            }
        }
        _ => return Err(bad("unknown reply type")),
    })
}

/// Polls `f` every 10 ms until it returns `Some`, or panics with `what`
/// after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------

/// The master name the sentinels of a [`SentinelSet`] monitor.
pub const MASTER_NAME: &str = "mymaster";

/// One master, its replicas and the sentinels that monitor them.
#[derive(Debug)]
pub struct SentinelSet {
    /// Data nodes; index 0 started as the master.
    nodes: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
}

impl SentinelSet {
    /// Starts a master, `replicas` replicas and `sentinels` sentinels
    /// (quorum: a majority) with `down-after-milliseconds` =
    /// `down_after_ms`; waits until every replica is in sync and every
    /// sentinel knows every replica and every other sentinel.
    pub fn start(replicas: usize, sentinels: usize, down_after_ms: u64) -> Self {
        Self::start_with(replicas, sentinels, down_after_ms, ServerOptions::new())
    }

    /// As [`start`](Self::start), every process with `opts`. With
    /// [`ServerOptions::tls`] the data nodes and the sentinels also serve
    /// TLS, replication and the sentinels' own connections use it
    /// (`tls-replication yes`), so the sentinels report the nodes' TLS
    /// ports; [`tls_sentinel_urls`](Self::tls_sentinel_urls) reach the
    /// sentinels. The harness keeps using the plain ports.
    pub fn start_with(
        replicas: usize,
        sentinels: usize,
        down_after_ms: u64,
        opts: ServerOptions,
    ) -> Self {
        let mut opts = opts;
        if opts.tls.is_some() {
            opts.extra_config.push("tls-replication yes".to_string());
        }
        let master = RedisServer::start_with(opts.clone());
        let mut nodes = vec![master];
        for _ in 0..replicas {
            let port = nodes[0].tls_port.unwrap_or(nodes[0].port);
            nodes.push(RedisServer::spawn(
                opts.clone(),
                Role::Replica { master_port: port },
            ));
        }
        for n in &nodes[1..] {
            wait_for("replica in sync", SETTLE_DEADLINE, || {
                (n.info_field("replication", "master_link_status").as_deref() == Some("up"))
                    .then_some(())
            });
        }
        let quorum = sentinels / 2 + 1;
        let mut text = format!(
            "sentinel monitor {MASTER_NAME} 127.0.0.1 {} {quorum}\n\
             sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n\
             sentinel failover-timeout {MASTER_NAME} 10000\n\
             sentinel parallel-syncs {MASTER_NAME} 1",
            nodes[0].tls_port.unwrap_or(nodes[0].port)
        );
        if let Some(u) = &opts.username {
            text.push_str(&format!("\nsentinel auth-user {MASTER_NAME} {u}"));
        }
        if let Some(p) = &opts.password {
            text.push_str(&format!("\nsentinel auth-pass {MASTER_NAME} {p}"));
        }
        let mut set = SentinelSet {
            nodes,
            sentinels: Vec::new(),
        };
        // The sentinels take the TLS files (and TLS for their own
        // connections) and the password (they require it too); the data
        // nodes' other options are not theirs.
        let mut sentinel_opts = ServerOptions::new();
        sentinel_opts.password.clone_from(&opts.password);
        if let Some(files) = &opts.tls {
            sentinel_opts = sentinel_opts
                .tls(files.clone())
                .config_line("tls-replication yes");
        }
        for _ in 0..sentinels {
            set.sentinels.push(RedisServer::spawn(
                sentinel_opts.clone(),
                Role::Sentinel { text: text.clone() },
            ));
        }
        for s in &set.sentinels {
            wait_for("sentinels to discover the set", SETTLE_DEADLINE, || {
                let known_replicas = s.cmd(&["SENTINEL", "REPLICAS", MASTER_NAME]).items().len();
                let known_sentinels = s.cmd(&["SENTINEL", "SENTINELS", MASTER_NAME]).items().len();
                (known_replicas == replicas && known_sentinels + 1 == sentinels).then_some(())
            });
        }
        set
    }

    /// The sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// The sentinels' `rediss://` URLs (empty without TLS).
    pub fn tls_sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .filter_map(RedisServer::tls_url)
            .collect()
    }

    /// A Sentinel [`RedisConfig`] for this set, with its credentials: the
    /// sentinels' password in their URLs, the data nodes' user and
    /// password in the config's fields.
    pub fn config(&self) -> RedisConfig {
        let opts = &self.nodes[0].opts;
        let pass = opts.password.as_deref();
        let mut cfg = RedisConfig::sentinel(
            MASTER_NAME,
            self.sentinel_urls()
                .into_iter()
                .map(|u| RedisUrl::new(with_password(&u, pass)).expect("valid url"))
                .collect(),
        );
        cfg.username.clone_from(&opts.username);
        cfg.password = opts.password.clone().map(Secret::new);
        cfg
    }

    /// The master's port as the first answering sentinel reports it.
    pub fn master_port(&self) -> u16 {
        for s in &self.sentinels {
            if !s.is_alive() {
                continue;
            }
            if let Ok(r) = s.try_cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]) {
                if let Some(p) = r.items().get(1).and_then(Resp::text) {
                    return p.parse().expect("numeric port");
                }
            }
        }
        panic!("no sentinel reports a master");
    }

    /// The data node currently reported as master.
    pub fn master(&mut self) -> &mut RedisServer {
        let port = self.master_port();
        self.node_by_port(port)
    }

    /// The data node on `port`.
    pub fn node_by_port(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.serves(port))
            .expect("a node of this set")
    }

    /// Every data node (master and replicas).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The sentinels.
    pub fn sentinels(&self) -> &[RedisServer] {
        &self.sentinels
    }

    /// `SENTINEL FAILOVER` on the first sentinel; waits until the sentinels
    /// report another master, which then answers `ROLE` master. Returns the
    /// new master's port.
    pub fn failover(&self) -> u16 {
        let old = self.master_port();
        let reply = self.sentinels[0].cmd(&["SENTINEL", "FAILOVER", MASTER_NAME]);
        assert!(reply.is_ok(), "SENTINEL FAILOVER: {reply:?}");
        self.wait_for_new_master(old, SETTLE_DEADLINE)
    }

    /// Waits until the sentinels report a master other than `old` and that
    /// node says it is master; returns its port.
    pub fn wait_for_new_master(&self, old: u16, deadline: Duration) -> u16 {
        wait_for("a new master", deadline, || {
            let port = self.master_port();
            if port == old {
                return None;
            }
            let node = self.nodes.iter().find(|n| n.serves(port))?;
            let role = node.try_cmd(&["ROLE"]).ok()?;
            (role.items().first().and_then(Resp::text).as_deref() == Some("master")).then_some(port)
        })
    }
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// A Redis Cluster of masters only, slots split evenly.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled nodes, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok` and knows every other node.
    pub fn start(masters: usize) -> Self {
        Self::start_with(masters, ServerOptions::new())
    }

    /// As [`start`](Self::start), every node with `opts`. With
    /// [`ServerOptions::tls`] the nodes also serve TLS, their bus speaks TLS
    /// (`tls-cluster yes`), and [`tls_urls`](Self::tls_urls) reach them;
    /// the harness keeps using the plain ports.
    pub fn start_with(masters: usize, opts: ServerOptions) -> Self {
        assert!(masters >= 3, "redis-cli --cluster create needs 3 masters");
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| RedisServer::spawn(opts.clone(), Role::ClusterNode))
            .collect();
        let mut cmd = Command::new("redis-cli");
        if let Some(u) = &opts.username {
            cmd.arg("--user").arg(u);
        }
        if let Some(p) = &opts.password {
            cmd.arg("--pass").arg(p).arg("--no-auth-warning");
        }
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = cmd
            .arg("--cluster-replicas")
            .arg("0")
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(SETTLE_DEADLINE);
        cluster
    }

    /// Waits until every live node reports `cluster_state:ok` and knows
    /// every node.
    pub fn wait_ok(&self, deadline: Duration) {
        for n in self.nodes.iter().filter(|n| n.is_alive()) {
            wait_for("cluster_state:ok", deadline, || {
                let info = n.try_cmd(&["CLUSTER", "INFO"]).ok()?.text()?;
                let ok = info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()));
                ok.then_some(())
            });
        }
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes' `rediss://` URLs (empty without TLS).
    pub fn tls_urls(&self) -> Vec<String> {
        self.nodes.iter().filter_map(RedisServer::tls_url).collect()
    }

    /// A Cluster [`RedisConfig`] seeded with every node, with the nodes'
    /// user and password.
    pub fn config(&self) -> RedisConfig {
        let mut cfg = RedisConfig::cluster(
            self.urls()
                .into_iter()
                .map(|u| RedisUrl::new(u).expect("valid url"))
                .collect(),
        );
        let opts = &self.nodes[0].opts;
        cfg.username.clone_from(&opts.username);
        cfg.password = opts.password.clone().map(Secret::new);
        cfg
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i`, to kill or stop.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_kill_restart_and_drop_leave_nothing() {
        let mut s = RedisServer::start_with(ServerOptions::new().password("pw-xyz"));
        assert_eq!(s.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
        let pid = s.pid();
        assert!(s.is_alive());
        s.kill9();
        assert!(!signal("-0", pid), "killed and reaped");
        s.restart();
        assert_eq!(s.cmd(&["GET", "k"]), Resp::Bulk(None), "persistence is off");
        let pid = s.pid();
        s.sigstop();
        s.sigcont();
        assert_eq!(s.cmd(&["PING"]), Resp::Simple("PONG".into()));
        drop(s);
        assert!(!signal("-0", pid), "dropped and reaped");
    }
}
