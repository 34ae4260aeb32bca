#!/usr/bin/env bash
# The one command that runs every check and every test of the workspace.
# It installs what the tests need when it is missing, then runs: rustfmt
# check, clippy with -D warnings, rustdoc with -D warnings, and all tests
# (unit, integration, conformance suites, doc tests; examples are built).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain: $(cargo --version), $(rustc --version)"
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "cargo doc (-D warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps

step "cargo test (every test, all features)"
cargo test --workspace --all-features
