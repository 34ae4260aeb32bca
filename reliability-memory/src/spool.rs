//! spool (being written)
