#!/usr/bin/env bash
# The long fuzz run: every knobs-fuzz target for EXECS mutants (default 60000: 17 targets,
# over 1,000,000 executions), in the dev profile so integer overflow panics too. Failing inputs
# go to fuzz-findings/. Prints one line per target and the total.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/knobs/target}"
cargo build -q -p knobs-fuzz
RUST_BACKTRACE=0 "$CARGO_TARGET_DIR/debug/knobs-fuzz" --execs "${EXECS:-60000}" --seed "${SEED:-1}" --findings fuzz-findings
