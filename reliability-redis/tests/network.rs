//! The network between the client and Redis, through the harness's fault
//! proxy: a black-holed connection (no FIN, no RST), a slow link, a reset.
//!
//! Callers bound their calls with a deadline shorter than the client's own
//! timeouts (a `Fallback`'s 250 ms against a 500 ms response timeout). The
//! client must not depend on its own timers firing: a call dropped at the
//! caller's deadline drops its connection, and a connect is not dropped
//! with the caller that started it.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::fresh_key_space;
use reliability_core::config::RedisConfig;
use reliability_redis::harness::{RedisServer, ServerOptions};
use reliability_redis::proxy::{Direction, FaultProxy};
use reliability_redis::RedisClient;

/// The default deadline of a `Fallback`.
const DEADLINE: Duration = Duration::from_millis(250);

fn proxied(server: &RedisServer, proxy: &FaultProxy) -> RedisConfig {
    let mut cfg = proxy.config(server);
    cfg.connect_timeout = Duration::from_millis(300);
    cfg
}

/// A server, a proxy in front of it, and a client connected through it.
async fn through_proxy() -> (RedisServer, FaultProxy, RedisClient) {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let client = RedisClient::connect(&proxied(&server, &proxy), fresh_key_space("net"))
        .await
        .expect("connect");
    (server, proxy, client)
}

/// `f` under the caller's deadline: `Some` when it answered `Ok` in time.
async fn within_deadline<T, E>(f: impl Future<Output = Result<T, E>>) -> Option<T> {
    tokio::time::timeout(DEADLINE, f).await.ok()?.ok()
}

/// Pings under the deadline until one answers, for at most `limit`;
/// returns how long it took.
async fn until_ping(client: &RedisClient, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if within_deadline(client.ping()).await.is_some() {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_connection_is_replaced_once_the_link_heals() {
    let (_server, proxy, client) = through_proxy().await;
    client.ping().await.expect("ping through the proxy");

    proxy.black_hole();
    for _ in 0..3 {
        let t = Instant::now();
        assert!(within_deadline(client.ping()).await.is_none());
        assert!(t.elapsed() < DEADLINE + Duration::from_millis(50));
    }
    proxy.heal();
    let took = until_ping(&client, Duration::from_secs(3)).await;
    assert!(
        took.is_some_and(|t| t <= Duration::from_secs(1)),
        "after healing, the first answer came after {took:?} (the black-holed connection \
         was kept)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_slower_than_the_deadline_completes_in_the_background() {
    // A password: the connect waits for `AUTH`'s reply, held 400 ms by
    // the proxy, as a slow TLS handshake or Sentinel lookup would be; a
    // command then takes a loopback round trip.
    let server = RedisServer::start_with(ServerOptions::new().password("net-pw"));
    let proxy = FaultProxy::start(server.port());
    proxy.set_connect_delay(Duration::from_millis(400));
    let mut cfg = proxied(&server, &proxy);
    cfg.connect_timeout = Duration::from_secs(2);
    let client = RedisClient::lazy(&cfg, fresh_key_space("net")).expect("client");
    let took = until_ping(&client, Duration::from_secs(3)).await;
    assert!(
        took.is_some(),
        "no call ever answered: each caller's deadline dropped the connect it started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_one_way_stall_are_survived() {
    let (_server, proxy, client) = through_proxy().await;

    proxy.reset();
    let took = until_ping(&client, Duration::from_secs(3)).await;
    assert!(took.is_some(), "no answer after a reset");

    // Replies held: requests pass, nothing comes back until the stall ends.
    proxy.stall(Direction::ToClient);
    assert!(within_deadline(client.ping()).await.is_none());
    proxy.heal();
    let took = until_ping(&client, Duration::from_secs(3)).await;
    assert!(
        took.is_some_and(|t| t <= Duration::from_secs(1)),
        "after a stall: {took:?}"
    );
}
