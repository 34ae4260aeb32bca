//! What a backend can promise, reported as data.
//!
//! The conformance suite gates its cases on these flags: a rule a backend
//! cannot keep is a flag it reports, never a silent difference.

/// A flat description of a backend's guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend's short name (`"memory"`, `"redis"`, `"disk"`, ...).
    pub backend: &'static str,
    /// State is shared by every process that uses the same backend
    /// (Redis), not private to this process.
    pub distributed: bool,
    /// Acknowledged writes survive a restart of this process.
    pub durable: bool,
    /// The backend can be closed and reopened on the same state, and the
    /// conformance suite's reopen cases apply.
    pub reopenable: bool,
    /// Memory use is bounded by configuration whatever the key count.
    pub bounded: bool,
}

impl Capabilities {
    /// Capabilities of a backend named `backend` with every flag off.
    pub const fn new(backend: &'static str) -> Self {
        Self {
            backend,
            distributed: false,
            durable: false,
            reopenable: false,
            bounded: false,
        }
    }

    /// Sets [`distributed`](Self::distributed).
    pub const fn with_distributed(mut self, v: bool) -> Self {
        self.distributed = v;
        self
    }

    /// Sets [`durable`](Self::durable).
    pub const fn with_durable(mut self, v: bool) -> Self {
        self.durable = v;
        self
    }

    /// Sets [`reopenable`](Self::reopenable).
    pub const fn with_reopenable(mut self, v: bool) -> Self {
        self.reopenable = v;
        self
    }

    /// Sets [`bounded`](Self::bounded).
    pub const fn with_bounded(mut self, v: bool) -> Self {
        self.bounded = v;
        self
    }
}
