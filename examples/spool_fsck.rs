//! Checks a disk spool directory: what it holds, what is corrupt, what was
//! quarantined before. With `--repair`, moves what is corrupt to
//! `quarantine/` (as opening the spool would) and reports what it moved.
//!
//! ```sh
//! cargo run --features disk --example spool_fsck -- /var/lib/gateway/spool
//! cargo run --features disk --example spool_fsck -- /var/lib/gateway/spool --repair
//! ```
//!
//! Exits with status 1 when corruption is found and not repaired, 2 on
//! usage or I/O errors.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use reliability::disk::{inspect, repair, InspectReport};

fn print_report(r: &InspectReport) {
    println!("spool directory: {}", r.dir.display());
    println!("segments: {}", r.segments.len());
    for s in &r.segments {
        println!(
            "  {:08}.log  {:>12} bytes  {:>8} frames  {:>8} records",
            s.number, s.bytes, s.entries, s.records
        );
    }
    println!(
        "records: {} waiting, {} leased, {} dead; {} payload bytes",
        r.waiting, r.leased, r.dead, r.bytes
    );
    if r.corruption.is_empty() {
        println!("corruption: none");
    } else {
        println!(
            "corruption: {} item(s) not yet quarantined",
            r.corruption.len()
        );
        for f in &r.corruption {
            println!("  {f}");
        }
    }
    println!("quarantine: {} item(s)", r.quarantined.len());
    for q in &r.quarantined {
        let first = q.reason.lines().next().unwrap_or("");
        let detail = q
            .reason
            .lines()
            .find_map(|l| l.strip_prefix("detail: "))
            .unwrap_or("");
        println!("  {}  ({first}) {detail}", q.name);
    }
}

fn main() -> ExitCode {
    let mut dir: Option<PathBuf> = None;
    let mut fix = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--repair" => fix = true,
            "-h" | "--help" => {
                println!("usage: spool_fsck <spool dir> [--repair]");
                return ExitCode::SUCCESS;
            }
            _ if dir.is_none() => dir = Some(PathBuf::from(arg)),
            _ => {
                println!("usage: spool_fsck <spool dir> [--repair]");
                return ExitCode::from(2);
            }
        }
    }
    let Some(dir) = dir else {
        println!("usage: spool_fsck <spool dir> [--repair]");
        return ExitCode::from(2);
    };
    if fix {
        match repair(&dir) {
            Ok(r) => {
                println!(
                    "repair: moved {} item(s) to quarantine, {} record(s) intact",
                    r.quarantined.len(),
                    r.records
                );
                for f in &r.quarantined {
                    println!("  {f}");
                }
            }
            Err(e) => {
                println!("repair failed: {e}");
                return ExitCode::from(2);
            }
        }
    }
    match inspect(&dir) {
        Ok(r) => {
            print_report(&r);
            if r.corruption.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            println!("inspect failed: {e}");
            ExitCode::from(2)
        }
    }
}
