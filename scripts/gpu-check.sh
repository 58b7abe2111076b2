#!/usr/bin/env bash
# The GPU check, sized for about 15 minutes on one large NVIDIA GPU (run it where the device
# tool lends one): builds knobs with `cuda`, runs the SD-1.x goldens on the GPU in f32 (the
# same checks as the CPU tests, tests/device_parity.rs, relative error <= 1e-5), a LoRA run of
# `knobs train` against the CPU's (knobs-train/tests/device_train.rs), then times a
# LoRA training step and one 512x512 generation step of a full-size SD-1.5 architecture with
# random weights, in f32 and in bf16 mixed precision, knobs and PyTorch on the same GPU, and
# prints the ratios.
#
#   scripts/gpu-check.sh [DEVICE]        DEVICE as --device spells it, default cuda:0
#
# The SD-1.5 folder: $SD15 if set, else made by ../shared/reference/make_sd15_random.py
# (needs torch, diffusers, transformers and open_clip). Without PyTorch on the machine the
# knobs side is still timed and the peer's lines say why they are missing.
# Results go to $OUT (default /tmp/gpu-check): gpu.txt, goldens.txt, knobs-{fp32,bf16}.json,
# peer-{fp32,bf16}.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda:0}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
# The goldens live beside the checkout (../shared); a copy inside it (shared/) also does.
if [ ! -d ../shared ] && [ -d shared ]; then ln -s "$PWD/shared" ../shared; fi
step() { echo; echo "== $* ($(date +%T))"; }

step "the GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || echo "nvidia-smi: not found" | tee "$OUT/gpu.txt"

step "build with cuda"
cargo build --release -p knobs --features cuda 2>&1 | tail -3 || exit 1
KNOBS=$CARGO_TARGET_DIR/release/knobs

step "goldens on $DEVICE (f32, relative error <= 1e-5)"
KNOBS_TEST_DEVICE=$DEVICE KNOBS_TEST_TOL=1e-5 cargo test --release -p knobs-diffusion --features cuda --test device_parity -- --nocapture --test-threads 1 2>&1 | tee "$OUT/goldens.txt" | grep -E "rel err|test result|panicked|FAILED"

step "a LoRA run on $DEVICE against the same run on the CPU (knobs train end to end)"
KNOBS_TEST_DEVICE=$DEVICE cargo test --release -p knobs-train --features cuda --test device_train -- --nocapture 2>&1 | tee "$OUT/train.txt" | grep -E "losses|test result|panicked|FAILED"

step "the UNet in bf16 on $DEVICE (mixed precision against the f32 golden)"
KNOBS_TEST_DEVICE=$DEVICE KNOBS_TEST_DTYPE=bf16 cargo test --release -p knobs-diffusion --features cuda --test device_parity half -- --ignored --nocapture 2>&1 | tee "$OUT/goldens-bf16.txt" | grep -E "rel err|test result|panicked|FAILED"

step "a full-size SD-1.5 architecture with random weights"
SD15=${SD15:-/tmp/sd15-random}
if [ ! -f "$SD15/model_index.json" ]; then
  python3 ../shared/reference/make_sd15_random.py "$SD15" --dtype fp16 > "$OUT/make_sd15.txt" 2>&1 || echo "could not make $SD15: $(tail -1 "$OUT/make_sd15.txt")"
fi
if [ ! -f "$SD15/model_index.json" ]; then
  echo "no SD-1.5 folder: set SD15=DIR to a diffusers SD-1.5 folder; timings skipped"
  exit 0
fi

has_peer=0
python3 -c "import torch, diffusers, peft; assert torch.cuda.is_available()" 2>/dev/null && has_peer=1
[ $has_peer = 1 ] || echo "no PyTorch with CUDA here (python3 -c 'import torch, diffusers, peft' failed): no peer, no ratios"
for dtype in fp32 bf16; do
  mp=no; [ $dtype = bf16 ] && mp=bf16
  step "knobs on $DEVICE, $dtype: LoRA step (batch 1) and one generation step, 512x512"
  "$KNOBS" --device "$DEVICE" bench --model "$SD15" --resolution 512 --batch 1 --steps 10 --warmup 3 --modes lora,generate --mixed-precision $mp --json | tee "$OUT/knobs-$dtype.json"
  : > "$OUT/peer-$dtype.jsonl"
  if [ $has_peer = 1 ]; then
    step "PyTorch on the same GPU, $dtype (autocast)"
    python3 scripts/peer_gpu.py "$SD15" --resolution 512 --batch 1 --steps 10 --warmup 3 --dtype $dtype | tee "$OUT/peer-$dtype.jsonl"
  fi
  step "ratios, $dtype (knobs / PyTorch, median seconds; <= 1.0 is the goal)"
  python3 - "$OUT/knobs-$dtype.json" "$OUT/peer-$dtype.jsonl" <<'PY'
import json, sys
knobs = {m["mode"]: m for m in json.load(open(sys.argv[1]))}
peer = {m["mode"]: m for m in map(json.loads, filter(str.strip, open(sys.argv[2])))}
for mode in ("lora", "generate"):
    k, p = knobs.get(mode), peer.get(mode)
    if k and p:
        print(f"{mode:>9}: knobs {k['median_s']:.3f} s, PyTorch {p['median_s']:.3f} s, ratio {k['median_s'] / p['median_s']:.2f}x")
    elif k:
        print(f"{mode:>9}: knobs {k['median_s']:.3f} s, no peer")
PY
done
