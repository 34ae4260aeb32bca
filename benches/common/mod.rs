//! Shared helpers of the benches.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Polls a future that completes without waiting (in-process backends) to
/// completion on the current thread, with no runtime overhead.
///
/// Panics if the future is not ready at once: that would mean the backend
/// waited, and the bench would measure the wrong thing.
pub(crate) fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-process backend should answer without waiting"),
    }
}
