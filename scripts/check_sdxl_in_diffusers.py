#!/usr/bin/env python3
"""Check that SDXL adapters trained by knobs load in diffusers and give knobs' images.

On the tiny random SDXL fixture (crates/knobs-diffusion/tests/fixtures/tiny-sdxl) this script
trains, with the knobs binary, (1) a LoRA on the UNet and both text encoders saved as a diffusers
file, (2) the same as a kohya file (sd-scripts' SDXL names), (3) a textual-inversion embedding
(clip_l / clip_g), and converts the fixture to an SDXL single file and back to a folder
(`knobs convert`). Then it generates one image with knobs (`knobs generate --latents`) and the same
call with diffusers' StableDiffusionXLPipeline after `load_lora_weights` /
`load_textual_inversion`, and compares them: the two must agree to within 8-bit rounding, and the
adapter must move the image well beyond that (so a loader that dropped it would fail). The
single file (`from_single_file(config=...)`) and the folder converted back must give diffusers'
own image of the fixture exactly.

    /tmp/ref-venv/bin/python scripts/check_sdxl_in_diffusers.py --knobs target/release/knobs

Needs torch, diffusers, transformers, safetensors, numpy, pillow; offline, CPU, under a minute.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "crates/knobs-diffusion/tests/fixtures/tiny-sdxl")
PROMPT = "a sks star"


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")


def train(knobs, out, method, extra):
    run([knobs, "train", "--model", TINY, "--method", method, "--concept", "striped-star", "--out", out,
         "--max-train-steps", "6", "--num-samples", "0", *extra])


def knobs_image(knobs, latents, out, extra):
    run([knobs, "generate", "--model", TINY, "--prompt", PROMPT, "--steps", "3", "--guidance", "5",
         "--latents", latents, "--out", out, *extra])
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255.0


def diffusers_image(latents, setup):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(TINY, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    setup(pipe)
    image = pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=latents, output_type="np").images[0]
    return np.round(image * 255.0) / 255.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--knobs", required=True, help="the knobs binary")
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="knobs-sdxl-check-")
    latents = torch.randn(1, 4, 16, 16)
    lat_file = os.path.join(tmp, "latents.safetensors")
    save_file({"latents": latents}, lat_file)

    lora, kohya, ti = (os.path.join(tmp, d) for d in ("lora", "kohya", "ti"))
    high = ["--learning-rate", "3e-2"]
    train(args.knobs, lora, "lora", ["--train-text-encoder", *high])
    train(args.knobs, kohya, "lora", ["--train-text-encoder", "--format", "kohya", *high])
    train(args.knobs, ti, "textual-inversion", ["--initializer-token", "star", "--learning-rate", "1.0"])

    base = diffusers_image(latents, lambda p: None)

    def lora_setup(path):
        return lambda p: p.load_lora_weights(path)

    def ti_setup(path):
        def setup(p):
            sd = load_file(path)
            p.load_textual_inversion(sd["clip_l"], token="sks", text_encoder=p.text_encoder, tokenizer=p.tokenizer)
            p.load_textual_inversion(sd["clip_g"], token="sks", text_encoder=p.text_encoder_2, tokenizer=p.tokenizer_2)
        return setup

    cases = [
        ("diffusers LoRA file", os.path.join(lora, "pytorch_lora_weights.safetensors"), "--lora", lora_setup),
        ("kohya LoRA file", os.path.join(kohya, "lora_kohya.safetensors"), "--lora", lora_setup),
        ("clip_l/clip_g embedding", os.path.join(ti, "learned_embeds.safetensors"), "--embedding", ti_setup),
    ]
    bad = 0
    for name, path, flag, setup in cases:
        ours = knobs_image(args.knobs, lat_file, os.path.join(tmp, f"{flag[2:]}-{len(name)}.png"), [flag, path])
        theirs = diffusers_image(latents, setup(path))
        diff = float(np.abs(ours - theirs).max())
        moved = float(np.abs(theirs - base).max())
        ok = diff <= 2.0 / 255.0 and moved > 8.0 / 255.0
        bad += not ok
        print(f"{name:26s} knobs vs diffusers max |diff| {diff * 255:.1f}/255, adapter moved the image {moved * 255:.1f}/255  {'ok' if ok else 'FAIL'}")
    from diffusers import StableDiffusionXLPipeline

    single, back = os.path.join(tmp, "xl.safetensors"), os.path.join(tmp, "back")
    run([args.knobs, "convert", "--model", TINY, "--out", single])
    run([args.knobs, "convert", "--model", single, "--config", TINY, "--out", back])
    for name, load in [
        ("SDXL single file", lambda: StableDiffusionXLPipeline.from_single_file(single, config=TINY, local_files_only=True, add_watermarker=False)),
        ("single file -> folder", lambda: StableDiffusionXLPipeline.from_pretrained(back, local_files_only=True, add_watermarker=False)),
    ]:
        pipe = load()
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=latents, output_type="np").images[0]
        diff = float(np.abs(np.round(theirs * 255.0) / 255.0 - base).max())
        bad += diff != 0.0
        print(f"{name:26s} in diffusers vs the fixture folder: max |diff| {diff * 255:.1f}/255  {'ok' if diff == 0.0 else 'FAIL'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
