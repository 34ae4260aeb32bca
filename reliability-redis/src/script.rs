//! Pieces shared by the Lua scripts of the backends.

use deadpool_redis::redis::{Cmd, Script, Value};
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

/// `EVALSHA sha numkeys`, ready for `numkeys` keys and then the
/// arguments: one allocation of the command's buffer for `args` keys and
/// arguments of about 24 bytes each. The backends append their keys and
/// arguments straight into it (integers formatted in place), instead of
/// building them as owned buffers that a `ScriptInvocation` copies again.
pub(crate) fn evalsha(script: &Script, numkeys: usize, args: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(3 + args, 64 + 24 * args);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(numkeys);
    cmd
}

/// Appends `ARGV[1]`: empty (read `TIME`) or the override's µs.
pub(crate) fn push_now(cmd: &mut Cmd, clock: Option<&SharedClock>) {
    match clock {
        Some(c) => cmd.arg(c.now().as_micros()),
        None => cmd.arg(""),
    };
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
