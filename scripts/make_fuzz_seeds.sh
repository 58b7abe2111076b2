#!/usr/bin/env bash
# Writes knobs-fuzz's committed seed files (crates/knobs-fuzz/seeds/) with knobs itself, on
# the built-in model: the smallest files of each kind the readers take (one LoRA module rank 1,
# a one-vector embedding, a 1,1 hypernetwork, a textual-inversion checkpoint), plus TOML
# configs and captions. The fixtures under crates/knobs-diffusion/tests/fixtures seed the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/knobs/target}"
cargo build -q -p knobs
knobs="$CARGO_TARGET_DIR/debug/knobs"
seeds=crates/knobs-fuzz/seeds
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p $seeds/{lora,embedding,hypernetwork,checkpoint,toml,caption}
common=(--concept striped-star --max-train-steps 1 --num-samples 0)
"$knobs" train --method lora "${common[@]}" --rank 1 --target-modules to_k --out "$work/d" > /dev/null
cp "$work/d/pytorch_lora_weights.safetensors" $seeds/lora/diffusers.safetensors
"$knobs" train --method lora "${common[@]}" --rank 1 --target-modules to_k --format kohya --out "$work/k" > /dev/null
cp "$work/k/lora_kohya.safetensors" $seeds/lora/kohya.safetensors
"$knobs" train --method textual-inversion --concept striped-star --num-samples 0 --a1111 --max-train-steps 2 --checkpointing-steps 1 \
  --out "$work/t" > /dev/null
cp "$work/t/learned_embeds.safetensors" $seeds/embedding/diffusers.safetensors
cp "$work/t/sks.safetensors" $seeds/embedding/a1111.safetensors
cp "$work/t/checkpoints/train-00000002.safetensors" $seeds/checkpoint/
"$knobs" train --method hypernetwork "${common[@]}" --hypernetwork-layers 1,1 --out "$work/h" > /dev/null
cp "$work/h"/*.safetensors $seeds/hypernetwork/
cat > $seeds/toml/lora.toml <<'TOML'
method = "lora"
concept = "striped-star"
rank = 4
alpha = 4.0
learning_rate = 1e-4
max_train_steps = 300
train_batch_size = 2
lr_scheduler = "cosine"
lr_warmup_steps = 10
target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
random_flip = true
TOML
cat > $seeds/toml/dreambooth.toml <<'TOML'
method = "dreambooth"
instance_dir = "images"
instance_prompt = "a sks dog"
class_prompt = "a dog"
num_class_images = 100
prior_loss_weight = 1.0
gradient_checkpointing = true
optimizer = "adamw8bit"
train_only = ["unet\\.up_blocks"]
lr_scale = ["attn2=0.5"]
TOML
printf 'a red circle on a white background' > $seeds/caption/plain.txt
printf 'a small sks star in the top left, striped blue and yellow, on a black background' > $seeds/caption/full.txt
ls -la $seeds/*
