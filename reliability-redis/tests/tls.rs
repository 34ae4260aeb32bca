//! `rediss://`: a redis-server serving TLS with a certificate this test
//! generates (openssl CLI: a throwaway CA and a server certificate for
//! 127.0.0.1), the client trusting that CA through `tls.caFile`.
#![allow(clippy::print_stdout)] // the test reports its figures

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::fresh_key_space;
use reliability_core::config::{RedisConfig, RedisUrl, TlsConfig};
use reliability_core::{Claim, Fingerprint, IdempotencyStore, Quota, RateLimiter};
use reliability_redis::harness::{RedisServer, ServerOptions, TlsFiles};
use reliability_redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certs(dir: &Path) -> TlsFiles {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=reliability test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    TlsFiles {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        ca: dir.join("ca.crt"),
    }
}

#[tokio::test]
async fn rediss_with_a_generated_certificate() {
    let certs_dir = tempfile::tempdir().unwrap();
    let files = make_certs(certs_dir.path());
    let server =
        RedisServer::start_with(ServerOptions::new().password("tls-pw").tls(files.clone()));
    let url = server.tls_url().expect("a TLS port");
    let url = url.replacen("rediss://", "rediss://:tls-pw@", 1);
    let mut cfg = RedisConfig::standalone(RedisUrl::new(url).unwrap());
    let mut tls = TlsConfig::default();
    tls.ca_file = Some(files.ca.clone());
    cfg.tls = Some(tls);

    let client = RedisClient::connect(&cfg, fresh_key_space("tls"))
        .await
        .expect("connect over TLS");
    let store = RedisIdempotencyStore::new(client.clone());
    let limiter = RedisRateLimiter::new(client.clone());
    assert!(matches!(
        store
            .claim("k", &Fingerprint::of(b"x"), Duration::from_secs(30))
            .await
            .unwrap(),
        Claim::Acquired(_)
    ));
    assert!(limiter
        .check("k", Quota::per_second(5).unwrap(), 1)
        .await
        .unwrap()
        .is_allowed());
    assert!(client.is_master().await.unwrap());
    assert!(!format!("{client:?}").contains("tls-pw"));
    println!("tls: claim and check over {}", server.tls_url().unwrap());

    // Without the CA the server's certificate is refused.
    let mut untrusted = cfg.clone();
    untrusted.tls = None;
    untrusted.connect_timeout = Duration::from_millis(500);
    let err = RedisClient::connect(&untrusted, fresh_key_space("tls"))
        .await
        .unwrap_err();
    println!("tls: without the CA -> {err}");
}
