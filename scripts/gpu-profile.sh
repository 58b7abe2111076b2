#!/usr/bin/env bash
# Where the device's time goes in the bench steps: runs `knobs bench` on DEVICE under CubeCL's
# kernel profiler (its timestamps, one line a kernel) and sums the device time by kernel
# against the steps' wall time (scripts/kernel_profile.py). Sized for a few minutes.
#
#   scripts/gpu-profile.sh [DEVICE]     KNOBS (the executable), SD15 (made if missing),
#                                       MODES (default "lora generate"), DTYPES (default fp32),
#                                       STEPS / WARMUP (default 2 / 2; autotune runs in the
#                                       warm-up), LIMIT (seconds a run, default 240)
# Results in $OUT (default /tmp/gpu-profile): <mode>-<dtype>.log (raw), .txt (summary), .json.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda:0}
KNOBS=$(realpath "${KNOBS:-target/release/knobs}")
MODES=${MODES:-lora generate}
DTYPES=${DTYPES:-fp32}
OUT=${OUT:-/tmp/gpu-profile}
SD15=${SD15:-/tmp/sd15-random}
STEPS=${STEPS:-2}
WARMUP=${WARMUP:-2}
LIMIT=${LIMIT:-240}
mkdir -p "$OUT"
if [ ! -d ../shared ] && [ -d shared ]; then ln -s "$PWD/shared" ../shared; fi
if [ ! -f "$SD15/model_index.json" ]; then
  python3 ../shared/reference/make_sd15_random.py "$SD15" --dtype fp16 > "$OUT/make_sd15.txt" 2>&1 || { tail -3 "$OUT/make_sd15.txt"; exit 1; }
fi
# CubeCL reads cubecl.toml from the working directory: the profiler's lines go to a file.
work=$(mktemp -d)
for dtype in $DTYPES; do
  mp=$dtype; [ "$dtype" = fp32 ] && mp=no
  for mode in $MODES; do
    log=$OUT/$mode-$dtype.log
    printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\nappend = false\n[autotune.logger]\nlevel = "minimal"\nfile = "%s"\n' "$log" "$OUT/autotune-$mode-$dtype.log" > "$work/cubecl.toml"
    echo "== $mode $dtype ($(date +%T))"
    (cd "$work" && timeout "$LIMIT" "$KNOBS" --device "$DEVICE" bench --model "$SD15" --resolution 512 --batch 1 \
      --steps "$STEPS" --warmup "$WARMUP" --modes "$mode" --mixed-precision "$mp" --json) | tee "$OUT/$mode-$dtype.json"
    python3 scripts/kernel_profile.py "$log" "$OUT/$mode-$dtype.json" --steps "$STEPS" --warmup "$WARMUP" | tee "$OUT/$mode-$dtype.txt"
  done
done
