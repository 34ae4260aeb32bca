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

step "redis binaries (the Redis tests start their own servers)"
if ! command -v redis-server >/dev/null || ! command -v redis-sentinel >/dev/null \
    || ! command -v redis-cli >/dev/null; then
    # Debian's redis-server, redis-sentinel and redis-tools; non-interactive,
    # no TTY needed (CI runs this as root; elsewhere sudo is used if present).
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends redis-server redis-sentinel redis-tools
    # The packaged service is not needed: the tests start their own servers.
    if command -v systemctl >/dev/null; then $SUDO systemctl stop redis-server 2>/dev/null || true; fi
fi
redis-server --version

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "cargo doc (-D warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps

step "cargo test (every test, all features)"
cargo test --workspace --all-features
