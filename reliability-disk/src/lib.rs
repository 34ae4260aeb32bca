//! Durable disk spool of the `reliability` crates (being written).
#![doc(test(attr(deny(warnings))))]
