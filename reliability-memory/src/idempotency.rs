//! idempotency (being written)
