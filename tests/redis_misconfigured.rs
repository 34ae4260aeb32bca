//! A Redis that is up but misconfigured for this layer (a wrong password,
//! an evicting `maxmemory-policy`) looks different from an outage in the
//! status: the service answers locally, and `redis.alert` names the cause,
//! so an operator does not wait for a Redis that is already up.
#![cfg(feature = "redis")]

use std::time::Duration;

use reliability::config::{OnEvictingPolicy, ReliabilityConfig, Secret};
use reliability::redis::harness::{RedisServer, ServerOptions};
use reliability::status::HealthStatus;
use reliability::{Claim, Fingerprint, IdempotencyStore, Reliability};

const LEASE: Duration = Duration::from_secs(30);

fn config(server: &RedisServer) -> ReliabilityConfig {
    let mut cfg = ReliabilityConfig::redis_enabled(server.config());
    cfg.namespace = format!("m{}", std::process::id());
    cfg.spool = Some(reliability::config::SpoolBackend::None);
    cfg.fallback.probe_interval = Duration::from_millis(50);
    cfg
}

/// `redis.alert` of the serialized status, if any.
fn alert(status: &HealthStatus) -> Option<String> {
    let doc = serde_norway::to_value(status.document()).expect("status serializes");
    doc.get("status")?
        .get("reliability")?
        .get("redis")?
        .get("alert")?
        .as_str()
        .map(str::to_string)
}

/// Waits (up to 5 s) until the status has an alert, and returns it.
async fn wait_alert(r: &Reliability) -> Option<String> {
    let mut rx = r.status().subscribe();
    let seen = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| alert(s).is_some()));
    let status = match seen.await {
        Ok(Ok(s)) => s.clone(),
        _ => r.status().current(),
    };
    alert(&status)
}

async fn claims_are_answered(r: &Reliability) {
    let claim = r
        .idempotency()
        .claim("evt", &Fingerprint::of(b"p"), LEASE)
        .await;
    assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
}

/// The profile on `server` as `user` / `password`: it answers claims (from
/// wherever), and the alert it shows.
async fn started_as(
    server: &RedisServer,
    user: Option<&str>,
    password: &str,
) -> (Reliability, Option<String>) {
    let mut cfg = config(server);
    if let Some(r) = cfg.redis.as_mut() {
        r.username = user.map(str::to_string);
        r.password = Some(Secret::new(password));
    }
    let r = Reliability::from_config(&cfg).await.expect("starts");
    claims_are_answered(&r).await;
    let alert = wait_alert(&r).await;
    (r, alert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_alert_not_an_outage() {
    let server = RedisServer::start_with(ServerOptions::new().password("the-right-one"));
    let (r, alert) = started_as(&server, None, "a-wrong-one").await;
    assert!(
        alert
            .as_deref()
            .is_some_and(|a| a.contains("authentication failed")),
        "alert: {alert:?}\nstatus: {:#?}",
        r.status().current()
    );
    assert!(!alert.unwrap_or_default().contains("a-wrong-one"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_policy_is_an_alert_and_answered_locally() {
    let server =
        RedisServer::start_with(ServerOptions::new().config_line("maxmemory-policy allkeys-lru"));
    let r = Reliability::from_config(&config(&server))
        .await
        .expect("starts");
    claims_are_answered(&r).await;
    let alert = wait_alert(&r).await;
    assert!(
        alert.as_deref().is_some_and(|a| a.contains("allkeys-lru")),
        "alert: {alert:?}\nstatus: {:#?}",
        r.status().current()
    );
    let idem = format!("reliability:idem:{}:evt", config(&server).namespace);
    assert_eq!(
        server.cmd(&["EXISTS", &idem]),
        reliability::redis::harness::Resp::Int(0),
        "the claim was not made on the evicting server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_evicting_policy_is_used_and_shown() {
    let server =
        RedisServer::start_with(ServerOptions::new().config_line("maxmemory-policy allkeys-lru"));
    let mut cfg = config(&server);
    if let Some(r) = cfg.redis.as_mut() {
        r.on_evicting_policy = OnEvictingPolicy::Accept;
    }
    let r = Reliability::from_config(&cfg).await.expect("starts");
    claims_are_answered(&r).await;
    let alert = wait_alert(&r).await;
    assert!(
        alert
            .as_deref()
            .is_some_and(|a| a.contains("allkeys-lru") && a.contains("accept")),
        "alert: {alert:?}"
    );
    let idem = format!("reliability:idem:{}:evt", cfg.namespace);
    assert_eq!(
        server.cmd(&["EXISTS", &idem]),
        reliability::redis::harness::Resp::Int(1),
        "the claim was made on Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_refusal_is_an_alert_not_an_outage() {
    // A user the server knows, refused the commands the probe sends (PING,
    // ROLE, and INFO for the server's identity).
    let server = RedisServer::start_with(
        ServerOptions::new()
            .config_line("user limited on >limited-pw ~* &* +@all -ping -role -info"),
    );
    let (_r, alert) = started_as(&server, Some("limited"), "limited-pw").await;
    assert!(
        alert.as_deref().is_some_and(|a| a.contains("ACL refusal")),
        "alert: {alert:?}"
    );
}
