#!/usr/bin/env bash
# Headless-Chromium check of `knobs serve`'s page at /: trains a one-step LoRA on the built-in
# model into a fresh store, serves it on a free loopback port, and lets check_serve_page.cjs
# pick the adapter, submit a prompt and wait for the image and the cache table.
# Needs: Debian's chromium (apt-get install chromium) and playwright-core
# (npm install --prefix "$PW" playwright-core; PW defaults to /tmp/pw). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PW="${PW:-/tmp/pw}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/knobs/target}"
cargo build -q -p knobs
knobs="$CARGO_TARGET_DIR/debug/knobs"
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
"$knobs" train --method lora --concept striped-star --out "$work/lora" --max-train-steps 1 --num-samples 0 --rank 2 \
  --learning-rate 0.05 > /dev/null
mkdir -p "$work/store"
cp "$work/lora/pytorch_lora_weights.safetensors" "$work/store/star.safetensors"
"$knobs" serve --adapters "$work/store" --addr 127.0.0.1:0 > "$work/serve.log" &
server=$!
for _ in $(seq 100); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
url=$(awk '/listening/ {print $3; exit}' "$work/serve.log")
NODE_PATH="$PW/node_modules" node scripts/check_serve_page.cjs "$url" star "${1:-/tmp/knobs-serve-page.png}"
