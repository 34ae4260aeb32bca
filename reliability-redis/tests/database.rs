//! The database a configuration asks for is the database written to: the
//! number in a URL's path (`redis://h:6379/3`) or the `db` field, which
//! must agree when both are given; a database the server does not have is
//! refused at start. Checked on a real server, database by database.

mod common;

use std::time::Duration;

use common::fresh_key_space;
use reliability_core::config::{RedisConfig, RedisUrl};
use reliability_core::{Claim, Error, Fingerprint, IdempotencyStore, KeySpace};
use reliability_redis::harness::{RedisServer, ServerOptions};
use reliability_redis::{RedisClient, RedisIdempotencyStore};

const LEASE: Duration = Duration::from_secs(30);

/// A server with four databases (0 to 3).
fn server() -> RedisServer {
    RedisServer::start_with(ServerOptions::new().config_line("databases 4"))
}

/// Keys in database `db` of `server` (from `INFO keyspace`).
fn keys_in(server: &RedisServer, db: u32) -> u64 {
    server
        .info_field("keyspace", &format!("db{db}"))
        .and_then(|v| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix("keys="))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

async fn claim_on(cfg: &RedisConfig, ks: KeySpace, id: &str) -> Claim {
    let client = RedisClient::connect(cfg, ks).await.expect("connect");
    RedisIdempotencyStore::new(client)
        .claim(id, &Fingerprint::of(b"p"), LEASE)
        .await
        .expect("claim")
}

/// `redis://h:port/3` writes to database 3, and two services told to use
/// databases 1 and 2 do not share keys.
#[tokio::test]
async fn the_url_database_is_the_one_written_to() {
    let server = server();
    let at = |db: u32| {
        RedisConfig::standalone(RedisUrl::new(format!("{}/{db}", server.url())).expect("url"))
    };
    let claim = claim_on(&at(3), fresh_key_space("db"), "evt_1").await;
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
    let counts: Vec<u64> = (0..4).map(|db| keys_in(&server, db)).collect();
    assert_eq!(counts, [0, 0, 0, 1], "keys per database 0..=3");

    // Two services, same key space, databases 1 and 2: both acquire.
    let ks = fresh_key_space("db");
    let first = claim_on(&at(1), ks.clone(), "shared").await;
    let second = claim_on(&at(2), ks, "shared").await;
    assert!(matches!(first, Claim::Acquired(_)), "{first:?}");
    assert!(matches!(second, Claim::Acquired(_)), "{second:?}");
    let counts: Vec<u64> = (0..4).map(|db| keys_in(&server, db)).collect();
    assert_eq!(counts, [0, 1, 1, 1], "keys per database 0..=3");
}

/// The `db` field writes where it says; a URL's database and the field must
/// agree; a database the server lacks is refused at start, naming the field.
#[tokio::test]
async fn the_db_field_agrees_with_the_url_and_exists() {
    let server = server();
    let mut cfg = RedisConfig::standalone(RedisUrl::new(server.url()).expect("url"));
    cfg.db = Some(2);
    let claim = claim_on(&cfg, fresh_key_space("db"), "evt_2").await;
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
    assert_eq!(keys_in(&server, 2), 1);

    // The same number twice is fine; two numbers are an error.
    let mut agree =
        RedisConfig::standalone(RedisUrl::new(format!("{}/2", server.url())).expect("url"));
    agree.db = Some(2);
    assert_eq!(agree.database().ok(), Some(2));
    RedisClient::connect(&agree, fresh_key_space("db"))
        .await
        .expect("agreeing url and db");
    let mut disagree = agree.clone();
    disagree.db = Some(1);
    let err = RedisClient::connect(&disagree, fresh_key_space("db"))
        .await
        .expect_err("url /2 and db 1");
    assert!(
        matches!(&err, Error::Config { field, .. } if field == "reliability.redis.db"),
        "{err:?}"
    );

    // Database 5 of a server with four: refused at start, naming db.
    for cfg in [
        {
            let mut c = cfg.clone();
            c.db = Some(5);
            c
        },
        RedisConfig::standalone(RedisUrl::new(format!("{}/5", server.url())).expect("url")),
    ] {
        let err = RedisClient::connect(&cfg, fresh_key_space("db"))
            .await
            .expect_err("database 5 of 4");
        assert!(
            matches!(&err, Error::Config { field, .. } if field == "reliability.redis.db"),
            "{err:?}"
        );
    }
}
