#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has no Rust toolchain and no
# network (the device tool's H200: CUDA, PyTorch, no cargo, no diffusers), here, where both are:
#   .gpu/bins.tar.xz  knobs and the device_parity test executable, built with FEATURE (cuda:
#                     CUDA through NVRTC, see crates/knobs-nn/src/cuda_without_llvm.rs; or
#                     vulkan, default), stripped, one xz stream (they share most code: 22 MB
#                     for 215); .gpu/feature names it, .gpu/source the sources it was built
#                     from (a pack of the same sources and feature is reused: the build is
#                     22-40 minutes of a session that holds a GPU; REBUILD=1 forces it)
#   .gpu/py/open_clip only the CLIP BPE vocabulary make_sd15_random.py reads from open_clip
#   .whl/             diffusers and importlib_metadata wheels (PyTorch's peer)
#   .gl/              the Vulkan loader and glvnd (NVIDIA's Vulkan driver needs libGLdispatch)
#   shared/           the goldens device_parity reads and make_sd15_random.py
# With the 27 MB tree that is over the 64 MiB a device call carries (65.7 MiB for the cuda pack
# on 2026-12-06); the last lines say whether scripts/gpu-aside.sh must move the unused model
# weights out for the call (50.8 MiB then). Then, on the device:
#   bash scripts/gpu-run.sh                 carrying .gpu .whl, and .gl for vulkan (shared/ travels by itself)
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURE=${FEATURE:-vulkan}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/knobs/target}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || printf '/.gpu/\n/.whl/\n/.gl/\n/shared/\n' >> .git/info/exclude

# What the executables are made of: the tracked sources' git trees, and whether edits are
# uncommitted (then nothing is reused).
source=$(git rev-parse HEAD:crates HEAD:Cargo.toml HEAD:Cargo.lock HEAD:.cargo | tr '\n' ' ')
git diff --quiet HEAD -- crates Cargo.toml Cargo.lock .cargo || source="uncommitted edits"
if [ "${REBUILD:-0}" != 1 ] && [ -f .gpu/bins.tar.xz ] && [ "$(cat .gpu/feature 2>/dev/null)" = "$FEATURE" ] \
  && [ "$source" != "uncommitted edits" ] && [ "$(cat .gpu/source 2>/dev/null)" = "$source" ]; then
  echo "reusing .gpu/bins.tar.xz: built with $FEATURE at $(cut -c1-10 .gpu/commit 2>/dev/null), from the same sources as HEAD ($(git log -1 --format=%h))"
else
cargo build --release -p knobs --features "$FEATURE"
parity=$(cargo test --release --no-run -p knobs-diffusion --features "$FEATURE" --test device_parity --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and "device_parity" in m["executable"]][-1])')
bins=$(mktemp -d)
cp "$CARGO_TARGET_DIR/release/knobs" "$bins/knobs"
cp "$parity" "$bins/device_parity"
strip "$bins/knobs" "$bins/device_parity"
mkdir -p .gpu
tar -cf - -C "$bins" knobs device_parity | xz -9e -T1 --lzma2=preset=9e,dict=256MiB > .gpu/bins.tar.xz
echo "$FEATURE" > .gpu/feature
echo "$source" > .gpu/source
git log -1 --format='%H %cI' > .gpu/commit
rm -rf "$bins"
fi
mkdir -p .gpu/py/open_clip

vocab=$(python3 -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("open_clip").origin), "bpe_simple_vocab_16e6.txt.gz"))' 2>/dev/null || true)
[ -f "$vocab" ] || vocab=$(ls /tmp/ref-venv/lib/python3*/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz 2>/dev/null | head -1)
[ -f "$vocab" ] || { echo "open_clip's bpe_simple_vocab_16e6.txt.gz not found (pip install open-clip-torch)" >&2; exit 1; }
cp "$vocab" .gpu/py/open_clip/ && touch .gpu/py/open_clip/__init__.py

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0

mkdir -p .gl /tmp/amd64/partial
apt_o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
apt-get $apt_o update -qq >/dev/null 2>&1 || true
(cd .gl && apt-get $apt_o download libvulkan1 libglvnd0 libglx0 libegl1 libgl1 libopengl0 libgles2 >/dev/null 2>&1) || { echo "apt-get download failed" >&2; exit 1; }

rm -rf shared && mkdir -p shared/golden/tensors shared/reference
cp -r ../shared/golden/tiny-sd shared/golden/
cp -r ../shared/golden/tensors/{unet,pipeline,lora_train_step}.safetensors ../shared/golden/tensors/lora_peft shared/golden/tensors/
cp ../shared/reference/make_sd15_random.py shared/reference/
# The Vulkan loader travels only for a Vulkan build.
carry=".gpu .whl"; [ "$FEATURE" = cuda ] || carry="$carry .gl"
# Tracked files travel too (those in the working tree); the largest are model weights the
# device run does not read, which scripts/gpu-aside.sh moves out for the call.
total=$( (git ls-files -z | xargs -0 cat 2>/dev/null; find shared $carry -type f -exec cat {} +) | wc -c)
aside=$(bash scripts/gpu-aside.sh list | xargs cat 2>/dev/null | wc -c)
echo "packed: $((total / 1024)) KiB to carry (limit $((64 * 1024))), $(((total - aside) / 1024)) KiB with scripts/gpu-aside.sh out: carry $carry"
if [ "$total" -gt $((64 * 1048576)) ]; then
  [ $((total - aside)) -le $((64 * 1048576)) ] || { echo "over the limit even with the models aside" >&2; exit 1; }
  echo "over the limit: run 'bash scripts/gpu-aside.sh out' before the device call and 'bash scripts/gpu-aside.sh back' after it"
fi
