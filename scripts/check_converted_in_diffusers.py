#!/usr/bin/env python3
"""Check that adapters converted by `knobs adapter convert` load in the reference libraries.

Starting from the golden diffusers LoRA of ../shared/golden/tiny-sd (tensors/lora_diffusers), the
knobs binary converts it --to kohya, --to peft and back --to diffusers, each from the previous
output; the diffusers and kohya files are loaded into a fresh UNet with diffusers'
`load_lora_weights` (through the tiny-sd pipeline), the PEFT folder with
`PeftModel.from_pretrained`. Each must reproduce the golden LoRA UNet output
(tensors/unet_lora.safetensors: out_lora) to 1e-5 relative. The LoHa and DoRA PEFT folders of
crates/knobs-diffusion/tests/fixtures/adapter_methods converted --to kohya (LyCORIS files) are
loaded with LyCORIS (through scripts/check_adapter_files_in_peft.py) and compared with that
fixture's goldens of the PEFT folders.

    /tmp/ref-venv/bin/python scripts/check_converted_in_diffusers.py --knobs target/debug/knobs

Needs torch, diffusers, peft, lycoris-lora (+ einops, toml); offline, CPU, under a minute.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "..", "shared", "golden")
TINY = os.path.join(GOLDEN, "tiny-sd")
METHODS = os.path.join(ROOT, "crates/knobs-diffusion/tests/fixtures/adapter_methods")


def convert(knobs, src, to, out):
    r = subprocess.run([knobs, "adapter", "convert", src, "--to", to, "--out", out, "--model", TINY], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"knobs adapter convert {src} --to {to} failed:\n{r.stderr}")


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def unet_out(unet, g):
    with torch.no_grad():
        return unet(g["sample"], g["timestep"], encoder_hidden_states=g["encoder_hidden_states"]).sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--knobs", required=True)
    args = ap.parse_args()
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel

    tmp = tempfile.mkdtemp(prefix="knobs-convert-check-")
    g = load_file(os.path.join(GOLDEN, "tensors/unet_lora.safetensors"))
    kohya, peft_dir, back = (os.path.join(tmp, n) for n in ("kohya.safetensors", "peft", "back.safetensors"))
    convert(args.knobs, os.path.join(GOLDEN, "tensors/lora_diffusers/pytorch_lora_weights.safetensors"), "kohya", kohya)
    convert(args.knobs, kohya, "peft", peft_dir)
    convert(args.knobs, peft_dir, "diffusers", back)
    bad = 0
    for name, path in [("kohya file", kohya), ("diffusers file (after kohya and PEFT)", back)]:
        pipe = StableDiffusionPipeline.from_pretrained(TINY, local_files_only=True, safety_checker=None)
        pipe.load_lora_weights(path)
        e = rel(unet_out(pipe.unet, g), g["out_lora"])
        bad += e > 1e-5
        print(f"{name:40s} diffusers load_lora_weights: rel {e:.1e}  {'ok' if e <= 1e-5 else 'FAIL'}")
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet", local_files_only=True)
    model = PeftModel.from_pretrained(unet, os.path.join(peft_dir, "unet_lora"))
    e = rel(unet_out(model, g), g["out_lora"])
    bad += e > 1e-5
    print(f"{'PEFT folder':40s} PeftModel.from_pretrained: rel {e:.1e}  {'ok' if e <= 1e-5 else 'FAIL'}")

    # LyCORIS files through the existing checker (its LyCORIS 4.1.3 workaround included).
    inputs = os.path.join(METHODS, "unet_methods.safetensors")
    files = []
    for method in ["loha", "dora"]:
        out = os.path.join(tmp, f"{method}.safetensors")
        convert(args.knobs, os.path.join(METHODS, f"{method}_peft"), "kohya", out)
        files += ["--lycoris", f"{out}={method}"]
    checker = os.path.join(ROOT, "scripts/check_adapter_files_in_peft.py")
    r = subprocess.run([sys.executable, checker, "--unet", os.path.join(TINY, "unet"), "--inputs", inputs, "--expect", inputs, "--tol", "1e-5", *files])
    bad += r.returncode != 0
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
