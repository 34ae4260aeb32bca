//! The health probe of a [`Fallback`](reliability_core::fallback::Fallback)
//! in front of Redis: `PING`, and behind Sentinel `ROLE` == master too, so a
//! demoted master is not taken for a healthy one.

use async_trait::async_trait;
use reliability_core::fallback::Probe;
use reliability_core::{Error, Result, UnavailableReason};

use crate::client::{Mode, RedisClient};
use crate::error::BACKEND;

#[async_trait]
impl Probe for RedisClient {
    async fn probe(&self) -> Result<()> {
        self.ping().await?;
        if self.mode() == Mode::Sentinel && !self.is_master().await? {
            return Err(Error::unavailable(
                BACKEND,
                UnavailableReason::ReadOnly,
                "the server the sentinels named is not a master (failover in progress)",
            ));
        }
        Ok(())
    }
}
