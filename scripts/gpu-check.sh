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
# DEVICE's backend (cuda, vulkan or wgpu) is also the cargo feature built. KNOBS_BIN=DIR skips
# the build and takes `knobs` and `device_parity` (the test executable) from DIR: for a machine
# with no Rust toolchain (scripts/gpu-pack.sh builds and packs them elsewhere). STEPS / WARMUP size the timings (default 10 / 3); DTYPES lists the precisions timed
# and checked (default "fp32 bf16"; fp16 too); TRAIN=0 skips the training run, PEER=0 PyTorch,
# GOLDENS=0 the golden checks (knobs' and PyTorch's), for a second run that only times.
# GPU_CONVS lists the KNOBS_GPU_CONV modes knobs is timed in (default "auto matmul burn"),
# each form once per precision: `auto` is burn's autotuned convolution kernels in f32 and one
# matrix product over the input's windows in half precision, so f32 skips `burn` and half
# precision `matmul`. Half precision with `burn` also gets its UNet golden check, as burn's
# direct kernel sums in the half dtype (see README, "GPUs and other backends").
#
# The SD-1.5 folder: $SD15 if set, else made by ../shared/reference/make_sd15_random.py
# (needs torch, diffusers, transformers and open_clip). Without PyTorch on the machine the
# knobs side is still timed and the peer's lines say why they are missing.
# Results go to $OUT (default /tmp/gpu-check): gpu.txt, goldens.txt, peer-goldens.jsonl (PyTorch's
# own UNet against the same golden, scripts/peer_golden.py), knobs-{fp32,bf16}-{auto,matmul,burn}.json,
# peer-{fp32,bf16}.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda:0}
FEATURE=${DEVICE%%:*}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
# No step may hang the check: each is stopped after LIMIT seconds (default 300).
LIMIT=${LIMIT:-300}
DTYPES=${DTYPES:-fp32 bf16}
GPU_CONVS=${GPU_CONVS:-auto matmul burn}
# Whether mode $2 is a form of its own in precision $1 (not what `auto` already runs).
distinct() { case "$1:$2" in fp32:burn | fp16:matmul | bf16:matmul) [[ " $GPU_CONVS " != *" auto "* ]] ;; *) true ;; esac; }
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
# The goldens live beside the checkout (../shared); a copy inside it (shared/) also does.
if [ ! -d ../shared ] && [ -d shared ]; then ln -s "$PWD/shared" ../shared; fi
step() { echo; echo "== $* ($(date +%T))"; }

step "the GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || echo "nvidia-smi: not found" | tee "$OUT/gpu.txt"

# The SD-1.5 folder is made on the CPU while the GPU runs the goldens.
SD15=${SD15:-/tmp/sd15-random}
if [ ! -f "$SD15/model_index.json" ]; then
  python3 ../shared/reference/make_sd15_random.py "$SD15" --dtype fp16 > "$OUT/make_sd15.txt" 2>&1 &
  MAKING=$!
fi

if [ -n "${KNOBS_BIN:-}" ]; then
  KNOBS=$KNOBS_BIN/knobs
  parity() { timeout "$LIMIT" "$KNOBS_BIN/device_parity" "$@"; }
else
  step "build with $FEATURE"
  cargo build --release -p knobs --features "$FEATURE" 2>&1 | tail -3 || exit 1
  KNOBS=$CARGO_TARGET_DIR/release/knobs
  parity() { cargo test --release -p knobs-diffusion --features "$FEATURE" --test device_parity -- "$@"; }
fi

goldens() { [ "${GOLDENS:-1}" != 0 ]; }
if goldens; then
  step "goldens on $DEVICE (f32, relative error <= 1e-5)"
  KNOBS_TEST_DEVICE=$DEVICE KNOBS_TEST_TOL=1e-5 parity --nocapture --test-threads 1 2>&1 | tee "$OUT/goldens.txt" | grep -E "rel err|test result|panicked|FAILED"
fi

has_peer=0
[ "${PEER:-1}" = 0 ] || { python3 -c "import torch, diffusers, peft; assert torch.cuda.is_available()" 2>/dev/null && has_peer=1; }
if [ $has_peer = 1 ] && goldens; then
  step "PyTorch's own UNet on the same GPU against the same golden (f32 with TF32 off, default, on; fp16, bf16)"
  timeout "$LIMIT" python3 scripts/peer_golden.py --device cuda --golden ../shared/golden 2>&1 | tee "$OUT/peer-goldens.jsonl"
fi

[ "${TRAIN:-1}" = 0 ] || step "a LoRA run on $DEVICE against the same run on the CPU (knobs train end to end)"
# The run of knobs-train/tests/device_train.rs, through the executable: 4 LoRA steps on tiny-sd
# with checkpoints and samples, on the CPU and on the device, compared by scripts/train_parity.py.
train_run() {
  timeout "$LIMIT" "$KNOBS" --device "$1" train --model ../shared/golden/tiny-sd --method lora --concept striped-star --max-train-steps 4 \
    --train-batch-size 2 --checkpointing-steps 2 --num-samples 1 --sample-steps 2 --out "$2" > "$2.log" 2>&1 || { echo "knobs train on $1 failed: $(tail -3 "$2.log")"; return 1; }
}
runs=$(mktemp -d)
[ "${TRAIN:-1}" = 0 ] || { train_run cpu "$runs/cpu" && train_run "$DEVICE" "$runs/device" &&
  python3 scripts/train_parity.py "$runs/cpu" "$runs/device" 2>&1 | tee "$OUT/train.txt"; }

for dtype in $DTYPES; do
  { [ "$dtype" = fp32 ] || ! goldens; } && continue
  step "the UNet in $dtype on $DEVICE (mixed precision against the f32 golden)"
  KNOBS_TEST_DEVICE=$DEVICE KNOBS_TEST_DTYPE=${dtype/fp16/f16} parity half --ignored --nocapture 2>&1 | tee "$OUT/goldens-$dtype.txt" | grep -E "rel err|test result|panicked|FAILED"
  if [[ " $GPU_CONVS " == *" burn "* ]]; then
    step "the UNet in $dtype on $DEVICE with burn's convolution kernels (KNOBS_GPU_CONV=burn)"
    KNOBS_GPU_CONV=burn KNOBS_TEST_DEVICE=$DEVICE KNOBS_TEST_DTYPE=${dtype/fp16/f16} parity half --ignored --nocapture 2>&1 | tee "$OUT/goldens-$dtype-burn.txt" | grep -E "rel err|test result|panicked|FAILED"
  fi
done

step "a full-size SD-1.5 architecture with random weights"
if [ -n "${MAKING:-}" ]; then
  wait "$MAKING" || echo "could not make $SD15: $(tail -1 "$OUT/make_sd15.txt")"
fi
if [ ! -f "$SD15/model_index.json" ]; then
  echo "no SD-1.5 folder: set SD15=DIR to a diffusers SD-1.5 folder; timings skipped"
  exit 0
fi

[ $has_peer = 1 ] || echo "no PyTorch with CUDA here (python3 -c 'import torch, diffusers, peft' failed): no peer, no ratios"
for dtype in $DTYPES; do
  mp=$dtype; [ $dtype = fp32 ] && mp=no
  for conv in $GPU_CONVS; do
    distinct $dtype $conv || continue
    step "knobs on $DEVICE, $dtype, KNOBS_GPU_CONV=$conv: LoRA step (batch 1) and one generation step, 512x512"
    KNOBS_GPU_CONV=$conv timeout "$LIMIT" "$KNOBS" --device "$DEVICE" bench --model "$SD15" --resolution 512 --batch 1 --steps "$STEPS" --warmup "$WARMUP" --modes lora,generate --mixed-precision $mp --json | tee "$OUT/knobs-$dtype-$conv.json"
  done
  : > "$OUT/peer-$dtype.jsonl"
  if [ $has_peer = 1 ]; then
    step "PyTorch on the same GPU, $dtype (autocast)"
    timeout "$LIMIT" python3 scripts/peer_gpu.py "$SD15" --resolution 512 --batch 1 --steps "$STEPS" --warmup "$WARMUP" --dtype $dtype | tee "$OUT/peer-$dtype.jsonl"
  fi
  for conv in $GPU_CONVS; do
    distinct $dtype $conv || continue
    step "ratios, $dtype, KNOBS_GPU_CONV=$conv (knobs / PyTorch, median seconds; <= 1.0 is the goal)"
    python3 - "$OUT/knobs-$dtype-$conv.json" "$OUT/peer-$dtype.jsonl" <<'PY'
import json, sys
try:
    knobs = {m["mode"]: m for m in json.load(open(sys.argv[1]))}
except ValueError:
    sys.exit("knobs: no timings (see above)")
peer = {m["mode"]: m for m in map(json.loads, filter(str.strip, open(sys.argv[2])))}
for mode in ("lora", "generate"):
    k, p = knobs.get(mode), peer.get(mode)
    if k and p:
        print(f"{mode:>9}: knobs {k['median_s']:.3f} s, PyTorch {p['median_s']:.3f} s, ratio {k['median_s'] / p['median_s']:.2f}x")
        peer_phases = p.get("phases") or {}
        for name, secs in k.get("phases") or []:
            if peer_phases.get(name):
                print(f"{'':>11}{name}: knobs {secs:.3f} s, PyTorch {peer_phases[name]:.3f} s, ratio {secs / peer_phases[name]:.2f}x")
    elif k:
        print(f"{mode:>9}: knobs {k['median_s']:.3f} s, no peer")
PY
done
done
