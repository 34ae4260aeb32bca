//! `rediss://`: a redis-server serving TLS with a certificate this test
//! generates (openssl CLI: a throwaway CA and a server certificate for
//! 127.0.0.1), the client trusting that CA through `tls.caFile`.
//!
//! A missing or unreadable CA, certificate or key file is a configuration
//! error naming its field, when the client is built; a server certificate
//! the client refuses (another CA, no CA given) is a clear TLS error, never
//! "unavailable" (a fallback would hide a deployment error behind an
//! outage).
//!
//! The same holds behind Sentinel (TLS to the sentinels and to the master
//! they name) and on a Cluster (`tls-cluster yes`: the nodes answer their
//! TLS ports over TLS), each behind an ACL user (and sentinels requiring
//! their password): TLS and credentials together.
#![allow(clippy::print_stdout)] // the test reports its figures

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::fresh_key_space;
use reliability_core::config::{RedisConfig, RedisUrl, Secret, TlsConfig};
use reliability_core::{Claim, Error, Fingerprint, IdempotencyStore, Quota, RateLimiter};
use reliability_redis::harness::{RedisCluster, RedisServer, SentinelSet, ServerOptions, TlsFiles};
use reliability_redis::{Mode, RedisClient, RedisIdempotencyStore, RedisRateLimiter};

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

    // Without the CA (system roots) the server's certificate is refused:
    // a TLS error, not "unavailable".
    let mut untrusted = cfg.clone();
    untrusted.tls = None;
    untrusted.connect_timeout = Duration::from_millis(500);
    let err = RedisClient::connect(&untrusted, fresh_key_space("tls"))
        .await
        .unwrap_err();
    println!("tls: without the CA -> {err}");
    assert_refused_certificate(&err);

    // A CA that did not sign the server's certificate: refused the same way.
    let (wrong_ca, _other_dir) = refused_with_another_ca(&cfg, "tls").await;
    // ... and so is every call of a lazily built client.
    let lazy = RedisClient::lazy(&wrong_ca, fresh_key_space("tls")).unwrap();
    let err = RedisRateLimiter::new(lazy)
        .check("k", Quota::per_second(5).unwrap(), 1)
        .await
        .unwrap_err();
    assert_refused_certificate(&err);
}

/// `cfg` trusting a freshly made CA that did not sign the server's
/// certificate: connecting is refused as a TLS error. Returns that config
/// (and the CA's directory, which must outlive it).
async fn refused_with_another_ca(
    cfg: &RedisConfig,
    space: &str,
) -> (RedisConfig, tempfile::TempDir) {
    let other_dir = tempfile::tempdir().unwrap();
    let other = make_certs(other_dir.path());
    let mut wrong_ca = cfg.clone();
    let mut tls = TlsConfig::default();
    tls.ca_file = Some(other.ca.clone());
    wrong_ca.tls = Some(tls);
    let err = RedisClient::connect(&wrong_ca, fresh_key_space(space))
        .await
        .unwrap_err();
    println!("{space}: another CA -> {err}");
    assert_refused_certificate(&err);
    (wrong_ca, other_dir)
}

fn assert_refused_certificate(err: &Error) {
    assert!(!err.is_unavailable(), "{err:?}");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("TLS handshake failed") && text.contains("reliability.redis.tls.caFile"),
        "{text}"
    );
}

/// The client built on `tls` for a TLS URL nobody serves: files are
/// checked when the client is built, before any connection.
fn build(tls: TlsConfig) -> Result<RedisClient, Error> {
    let mut cfg = RedisConfig::standalone(RedisUrl::new("rediss://127.0.0.1:1/0").unwrap());
    cfg.tls = Some(tls);
    RedisClient::lazy(&cfg, fresh_key_space("tls"))
}

fn config_field(err: &Error) -> &str {
    match err {
        Error::Config { field, .. } => field,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test]
async fn unreadable_tls_files_are_configuration_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_certs(dir.path());
    let missing = dir.path().join("does-not-exist.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let bad_base64 = dir.path().join("bad.pem");
    std::fs::write(
        &bad_base64,
        "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let garbage_der = dir.path().join("garbage-der.pem");
    std::fs::write(
        &garbage_der,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();

    let ca = |path: &Path| {
        let mut t = TlsConfig::default();
        t.ca_file = Some(path.to_path_buf());
        t
    };
    for (what, path) in [
        ("missing", &missing),
        ("not PEM", &not_pem),
        ("bad base64", &bad_base64),
        ("not a certificate", &garbage_der),
        // A private key where the CA belongs.
        ("a key", &files.key),
    ] {
        let err = build(ca(path)).unwrap_err();
        println!("tls: caFile {what} -> {err}");
        assert_eq!(config_field(&err), "reliability.redis.tls.caFile", "{what}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    let mutual = |cert: &Path, key: &Path| {
        let mut t = ca(&files.ca);
        t.cert_file = Some(cert.to_path_buf());
        t.key_file = Some(key.to_path_buf());
        t
    };
    for (what, cert, key, field) in [
        (
            "cert missing",
            &missing,
            &files.key,
            "reliability.redis.tls.certFile",
        ),
        (
            "cert not PEM",
            &not_pem,
            &files.key,
            "reliability.redis.tls.certFile",
        ),
        (
            "cert is a key",
            &files.key,
            &files.key,
            "reliability.redis.tls.certFile",
        ),
        (
            "key missing",
            &files.cert,
            &missing,
            "reliability.redis.tls.keyFile",
        ),
        (
            "key not PEM",
            &files.cert,
            &not_pem,
            "reliability.redis.tls.keyFile",
        ),
        (
            "key is a cert",
            &files.cert,
            &files.cert,
            "reliability.redis.tls.keyFile",
        ),
    ] {
        let err = build(mutual(cert, key)).unwrap_err();
        println!("tls: {what} -> {err}");
        assert_eq!(config_field(&err), field, "{what}");
    }

    // certFile without keyFile.
    let mut half = ca(&files.ca);
    half.cert_file = Some(files.cert.clone());
    assert_eq!(
        config_field(&build(half).unwrap_err()),
        "reliability.redis.tls"
    );

    // The good files build (and a client certificate with its key is fine).
    build(ca(&files.ca)).expect("the CA file is fine");
    build(mutual(&files.cert, &files.key)).expect("a certificate and its key are fine");
}

#[tokio::test]
async fn rediss_cluster() {
    let certs_dir = tempfile::tempdir().unwrap();
    let files = make_certs(certs_dir.path());
    let cluster = RedisCluster::start_with(
        3,
        ServerOptions::new()
            .tls(files.clone())
            .acl_user("tls-user", "tls-cluster-pw"),
    );
    let urls = cluster.tls_urls();
    assert_eq!(urls.len(), 3);
    let mut cfg = RedisConfig::cluster(urls.iter().map(|u| RedisUrl::new(u).unwrap()).collect());
    cfg.username = Some("tls-user".into());
    cfg.password = Some(Secret::new("tls-cluster-pw"));
    let mut tls = TlsConfig::default();
    tls.ca_file = Some(files.ca.clone());
    cfg.tls = Some(tls);

    let client = RedisClient::connect(&cfg, fresh_key_space("tlsc"))
        .await
        .expect("connect to the cluster over TLS");
    assert_eq!(client.mode(), Mode::Cluster);
    let store = RedisIdempotencyStore::new(client.clone());
    let limiter = RedisRateLimiter::new(client.clone());
    // Keys on every master's slots.
    for i in 0..30 {
        let key = format!("k{i}");
        let claim = store
            .claim(&key, &Fingerprint::of(b"x"), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Acquired(_)), "{key}: {claim:?}");
        assert!(limiter
            .check(&key, Quota::per_second(5).unwrap(), 1)
            .await
            .unwrap()
            .is_allowed());
    }
    let mut used = 0;
    for n in cluster.nodes() {
        let keys = n.cmd(&["DBSIZE"]);
        println!("tls cluster: node {} holds {keys:?}", n.port());
        if keys != reliability_redis::harness::Resp::Int(0) {
            used += 1;
        }
    }
    assert_eq!(used, 3, "every master served keys");
    println!("tls cluster: 30 claims and checks over {urls:?}");

    // Another CA: refused, clearly.
    refused_with_another_ca(&cfg, "tlsc").await;

    // One scheme for all nodes.
    let mut mixed = cfg.clone();
    let mut urls = cluster.tls_urls();
    urls[0] = cluster.urls()[0].clone();
    mixed.cluster.as_mut().unwrap().urls = urls.iter().map(|u| RedisUrl::new(u).unwrap()).collect();
    let err = RedisClient::lazy(&mixed, fresh_key_space("tlsc")).unwrap_err();
    assert_eq!(config_field(&err), "reliability.redis.cluster.urls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_sentinel() {
    let certs_dir = tempfile::tempdir().unwrap();
    let files = make_certs(certs_dir.path());
    let set = tokio::task::block_in_place(|| {
        SentinelSet::start_with(
            1,
            1,
            5_000,
            ServerOptions::new()
                .tls(files.clone())
                .acl_user("tls-user", "tls-sentinel-pw"),
        )
    });
    let urls = set.tls_sentinel_urls();
    assert_eq!(urls.len(), 1);
    let master = set.master_port();
    assert_eq!(
        Some(master),
        set.nodes()[0]
            .tls_url()
            .and_then(|u| u.rsplit(':').next()?.parse().ok()),
        "the sentinel reports the master's TLS port"
    );
    // The sentinels' password in their URLs, the data nodes' user and
    // password in the config.
    let mut cfg = RedisConfig::sentinel(
        reliability_redis::harness::MASTER_NAME,
        urls.iter()
            .map(|u| {
                RedisUrl::new(u.replacen("rediss://", "rediss://:tls-sentinel-pw@", 1)).unwrap()
            })
            .collect(),
    );
    cfg.username = Some("tls-user".into());
    cfg.password = Some(Secret::new("tls-sentinel-pw"));
    let mut tls = TlsConfig::default();
    tls.ca_file = Some(files.ca.clone());
    cfg.tls = Some(tls);

    let client = RedisClient::connect(&cfg, fresh_key_space("tlss"))
        .await
        .expect("connect through TLS sentinels to the TLS master");
    assert_eq!(client.mode(), Mode::Sentinel);
    assert!(client.is_master().await.unwrap());
    let store = RedisIdempotencyStore::new(client.clone());
    assert!(matches!(
        store
            .claim("k", &Fingerprint::of(b"x"), Duration::from_secs(30))
            .await
            .unwrap(),
        Claim::Acquired(_)
    ));
    println!("tls sentinel: claim through {urls:?}, master on TLS port {master}");

    // Another CA: refused, clearly.
    refused_with_another_ca(&cfg, "tlss").await;
}
