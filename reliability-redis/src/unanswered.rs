//! Claims whose answer never came. A claim sent to a Redis that hangs
//! (SIGSTOP) or dies (its append-only file kept the write) times out, or
//! its caller gives up at a deadline, yet Redis may run it: the key is then
//! held under a lease token no caller has, and would answer "in progress"
//! to everyone until that lease ends. The store remembers these tokens and
//! releases them (owner-checked: only the unanswered claim's own hold goes)
//! when it meets the key in progress again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reliability_core::LeaseToken;

/// Keys remembered at most; past it, new unanswered claims are not (their
/// keys answer in progress until the lease ends, as without this record).
const MAX_KEYS: usize = 4_096;

/// Tokens are kept at most this long (a longer lease still ends in time
/// arithmetic that cannot overflow).
const LONGEST: Duration = Duration::from_secs(366 * 86_400);

/// Tokens of unanswered claims by key, each with the end of its lease.
#[derive(Debug, Default)]
pub(crate) struct Unanswered {
    tokens: Mutex<HashMap<String, Vec<Token>>>,
}

/// A remembered token and the end of its lease.
pub(crate) type Token = (LeaseToken, Instant);

impl Unanswered {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Token>>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A claim of `key` under `token` is being sent: remembered unless
    /// [`Sent::answered`] is called before the returned guard drops.
    pub(crate) fn sent<'a>(&'a self, key: &'a str, token: LeaseToken, lease: Duration) -> Sent<'a> {
        let until = Instant::now() + lease.min(LONGEST);
        Sent {
            unanswered: self,
            claim: Some((key, (token, until))),
        }
    }

    /// Remembers `token` for `key` (see the module docs).
    pub(crate) fn remember(&self, key: &str, token: Token) {
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            map.retain(|_, v| {
                v.retain(|(_, until)| *until > now);
                !v.is_empty()
            });
            if map.len() >= MAX_KEYS {
                return;
            }
        }
        map.entry(key.to_string()).or_default().push(token);
    }

    /// Takes the tokens remembered for `key` whose lease has not ended.
    pub(crate) fn take(&self, key: &str) -> Vec<Token> {
        let now = Instant::now();
        let mut tokens = self.lock().remove(key).unwrap_or_default();
        tokens.retain(|(_, until)| *until > now);
        tokens
    }
}

/// A claim in flight (see [`Unanswered::sent`]).
pub(crate) struct Sent<'a> {
    unanswered: &'a Unanswered,
    /// The key and token, until Redis answers.
    claim: Option<(&'a str, Token)>,
}

impl Sent<'_> {
    /// Redis answered the claim: nothing to remember.
    pub(crate) fn answered(mut self) {
        self.claim = None;
    }
}

impl Drop for Sent<'_> {
    fn drop(&mut self) {
        if let Some((key, token)) = self.claim.take() {
            self.unanswered.remember(key, token);
        }
    }
}
