//! The health probe of a [`Fallback`](reliability_core::fallback::Fallback)
//! in front of Redis: `PING`, and behind Sentinel `ROLE` == master too, so a
//! demoted master is not taken for a healthy one.
//!
//! The background probe asks `INFO server replication` instead (one round
//! trip): the role, and the server's identity, `run_id` (new on every
//! restart) and `master_replid` (new when a failover promotes a replica), so
//! the breaker notices a Redis that came back without the data it had.

use async_trait::async_trait;
use deadpool_redis::redis::{self, Value};
use reliability_core::fallback::{PrimaryIdentity, Probe};
use reliability_core::{Error, Result, UnavailableReason};

use crate::client::{Mode, RedisClient};
use crate::error::{unexpected, BACKEND};

fn not_master() -> Error {
    Error::unavailable(
        BACKEND,
        UnavailableReason::ReadOnly,
        "the server the sentinels named is not a master (failover in progress)",
    )
}

#[async_trait]
impl Probe for RedisClient {
    async fn probe(&self) -> Result<()> {
        self.ping().await?;
        if self.mode() == Mode::Sentinel && !self.is_master().await? {
            return Err(not_master());
        }
        Ok(())
    }

    /// In cluster mode (many servers, each its own identity) this is
    /// [`probe`](Probe::probe) and reports no identity.
    async fn probe_identity(&self) -> Result<Option<PrimaryIdentity>> {
        if self.mode() == Mode::Cluster {
            return self.probe().await.map(|()| None);
        }
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server").arg("replication");
        let text = match self.query(&cmd).await? {
            Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            Value::VerbatimString { text, .. } => text,
            Value::SimpleString(s) => s,
            other => return Err(unexpected("INFO", other)),
        };
        let info = Info::parse(&text);
        if self.mode() == Mode::Sentinel && info.role != Some("master") {
            return Err(not_master());
        }
        Ok(info
            .run_id
            .map(|run_id| PrimaryIdentity::new(run_id, info.replication_id.map(str::to_owned))))
    }
}

/// The fields of `INFO` the probe reads.
#[derive(Debug, Default, PartialEq, Eq)]
struct Info<'a> {
    role: Option<&'a str>,
    run_id: Option<&'a str>,
    replication_id: Option<&'a str>,
}

impl<'a> Info<'a> {
    fn parse(text: &'a str) -> Self {
        let mut info = Info::default();
        for line in text.lines() {
            let Some((field, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            match field {
                "role" => info.role = Some(value),
                "run_id" => info.run_id = Some(value),
                "master_replid" => info.replication_id = Some(value),
                _ => {}
            }
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::Info;

    #[test]
    fn info_fields_are_read() {
        let text = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc\r\n\r\n# Replication\r\nrole:master\r\nconnected_slaves:0\r\nmaster_replid:def\r\nmaster_replid2:000\r\n";
        assert_eq!(
            Info::parse(text),
            Info {
                role: Some("master"),
                run_id: Some("abc"),
                replication_id: Some("def"),
            }
        );
    }
}
