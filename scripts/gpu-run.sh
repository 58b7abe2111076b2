#!/usr/bin/env bash
# The device side of scripts/gpu-pack.sh: unpacks the Vulkan loader, the wheels and the
# executables, then runs scripts/gpu-check.sh DEVICE (default: the packed backend's device 0,
# cuda:0 or vulkan:0) with them; its results
# come back as $OUT/gc.tar (the device tool returns 8 files at most).
#   bash scripts/gpu-run.sh [DEVICE]    STEPS, WARMUP, LIMIT, DTYPES, GPU_CONVS, TRAIN, PEER, GOLDENS as
#                                       gpu-check's; CHECK=profile runs scripts/gpu-profile.sh instead
# A device call ends at 600 s with nothing back but what lies in $OUT, so the check stops at
# BUDGET seconds (default 560) and what it wrote is packed either way. A second call can then
# time what the first did not reach: GOLDENS=0 TRAIN=0 skips the goldens and the training run.
set -u
cd "$(dirname "$0")/.."
results=${OUT:-/tmp}; export OUT=/tmp/gc; mkdir -p "$OUT"
echo "pack: $(cat .gpu/feature 2>/dev/null) build of $(cat .gpu/commit 2>/dev/null || echo 'an unrecorded commit')" | tee "$OUT/pack.txt"
for f in .gl/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/py PYTHONUNBUFFERED=1
# The test executable reads the goldens where they were when it was built: the packing
# checkout's ../shared (/work/shared for a checkout at /work/main).
mkdir -p /work/main/crates/knobs-diffusion
[ -e /work/shared/golden ] || { rm -rf /work/shared; ln -s "$PWD/shared" /work/shared; }
mkdir -p /tmp/bin && tar -xJf .gpu/bins.tar.xz -C /tmp/bin || exit 1
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$icd" ] && export VK_DRIVER_FILES=$icd
# The packed build's backend (gpu-pack.sh writes it) names the default device.
device=${1:-$(cat .gpu/feature 2>/dev/null || echo vulkan):0}
# A `cuda` build compiles its kernels with NVRTC against the CUDA toolkit's headers (CUDA_PATH,
# default /usr/local/cuda) and loads libnvrtc at run time: the toolkit's, or PyTorch's wheels'.
if [ "${device%%:*}" = cuda ]; then
  nvcc=$(command -v nvcc || true)
  [ -d /usr/local/cuda ] || [ -z "$nvcc" ] || export CUDA_PATH=${CUDA_PATH:-$(dirname "$(dirname "$nvcc")")}
  # Prepended in turn, so the toolkit's (matching its headers) comes first.
  for d in $(python3 -c 'import glob, os, nvidia; print(" ".join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))))' 2>/dev/null) ${CUDA_PATH:-/usr/local/cuda}/lib64; do
    [ -d "$d" ] && LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  done
  export LD_LIBRARY_PATH
fi
# timeout runs the check in a process group of its own and stops all of it at the budget.
if [ "${CHECK:-}" = profile ]; then
  KNOBS=/tmp/bin/knobs timeout -k 10 "${BUDGET:-560}" bash scripts/gpu-profile.sh "$device"
else
  STEPS=${STEPS:-5} WARMUP=${WARMUP:-2} LIMIT=${LIMIT:-150} KNOBS_BIN=/tmp/bin timeout -k 10 "${BUDGET:-560}" bash scripts/gpu-check.sh "$device"
fi
rc=$?
[ $rc = 124 ] && echo "== stopped at the budget (${BUDGET:-560} s): what ran is in gc.tar; GOLDENS=0 TRAIN=0 times the rest"
tar -cf "$results/gc.tar" -C /tmp gc
