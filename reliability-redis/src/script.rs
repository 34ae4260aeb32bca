//! Pieces shared by the Lua scripts of the backends.

use deadpool_redis::redis::Value;
use reliability_core::SharedClock;

/// Prologue of every script: `now` in µs from Redis `TIME`, or from
/// `ARGV[1]` when a test clock override passed one. A double holds µs since
/// the epoch exactly (below 2^53).
pub(crate) const LUA_NOW: &str = r"
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
";

/// `ARGV[1]`: empty (read `TIME`) or the override's µs.
pub(crate) fn now_arg(clock: Option<&SharedClock>) -> Vec<u8> {
    match clock {
        Some(c) => c.now().as_micros().to_string().into_bytes(),
        None => Vec::new(),
    }
}

/// An integer reply (Lua numbers arrive as integers).
pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}
