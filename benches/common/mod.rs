//! Shared helpers of the benches.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Polls a future that completes without waiting (in-process backends) to
/// completion on the current thread, with no runtime overhead.
///
/// Panics if the future is not ready at once: that would mean the backend
/// waited, and the bench would measure the wrong thing.
#[allow(dead_code)] // the Redis benches wait on purpose
pub(crate) fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-process backend should answer without waiting"),
    }
}

/// Runs `op(task, i)` in `tasks` tokio tasks, each calling it again as soon
/// as the last call returned, for `step`: (operations, seconds).
#[allow(dead_code)] // the in-process benches do not drive tasks
pub(crate) async fn closed_loop<F, Fut>(tasks: usize, step: Duration, op: F) -> (u64, f64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + step;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (op, done) = (op.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < end {
                op(t, i).await;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        h.await.expect("bench task");
    }
    (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}
