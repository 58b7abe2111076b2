#!/usr/bin/env bash
# Moves the tracked model weights that a device call never reads (the built-in base model's
# UNet, HyperLoRA's and the judge's weights: 15 MB) out of the working tree and back, so that
# the tree, the goldens and scripts/gpu-pack.sh's executables fit the 64 MiB a device call
# carries (the device tool sends every tracked file that is in the working tree).
#   bash scripts/gpu-aside.sh out     before the device call
#   bash scripts/gpu-aside.sh back    right after it (`git checkout -- models` also restores them)
#   bash scripts/gpu-aside.sh list    the files it moves (scripts/gpu-pack.sh counts them)
set -euo pipefail
cd "$(dirname "$0")/.."
aside=.gpu-aside
files=(models/knobs-base/unet/diffusion_pytorch_model.safetensors models/hyperlora/hyperlora.safetensors models/judge/judge.safetensors)
grep -qx "/$aside/" .git/info/exclude 2>/dev/null || echo "/$aside/" >> .git/info/exclude
case "${1:-}" in
  out)
    for f in "${files[@]}"; do
      [ -e "$f" ] || continue
      mkdir -p "$aside/$(dirname "$f")" && mv "$f" "$aside/$f"
    done ;;
  back)
    for f in "${files[@]}"; do
      [ -e "$aside/$f" ] && mv "$aside/$f" "$f"
    done
    # Anything missing still (an aside folder lost with a machine) comes from git.
    git checkout -- "${files[@]}"
    git diff --quiet -- "${files[@]}" || { echo "models differ from HEAD after restoring" >&2; exit 1; } ;;
  list) printf '%s\n' "${files[@]}" ;;
  *) echo "usage: scripts/gpu-aside.sh out|back|list" >&2; exit 2 ;;
esac
