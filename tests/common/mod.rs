//! Helpers shared by the facade's integration tests.

use std::time::Duration;

use reliability::status::HealthStatus;
use tokio::sync::watch;

/// Waits until the status satisfies `f`, at most `within`; panics naming
/// `what` if it never does.
pub(crate) async fn wait_status(
    rx: &mut watch::Receiver<HealthStatus>,
    within: Duration,
    what: &str,
    f: impl FnMut(&HealthStatus) -> bool,
) -> HealthStatus {
    tokio::time::timeout(within, rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("status not {what} within {within:?}"))
        .expect("status hub alive")
        .clone()
}
