//! Configuration model (see issue).
