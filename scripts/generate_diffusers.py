"""Generates one image with diffusers' StableDiffusionPipeline from a diffusers folder, from seeded
latents that it also saves, so that `knobs generate --latents` can be compared with it pixel for
pixel: the check that a model knobs made (e.g. models/knobs-base) loads and runs in diffusers.

Usage: python generate_diffusers.py MODEL_DIR OUT_PNG LATENTS_SAFETENSORS [--prompt P] [--steps 25] [--guidance 5]
Then:  knobs generate --model MODEL_DIR --prompt P --steps 25 --guidance 5 --latents LATENTS --out OTHER_PNG
"""
import argparse

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("out")
p.add_argument("latents")
p.add_argument("--prompt", default="a large red star on a white background")
p.add_argument("--steps", type=int, default=25)
p.add_argument("--guidance", type=float, default=5.0)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
side = pipe.unet.config.sample_size
latents = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(a.seed))
save_file({"latents": latents.contiguous()}, a.latents)
image = pipe(a.prompt, num_inference_steps=a.steps, guidance_scale=a.guidance, latents=latents.clone(), output_type="np").images[0]
Image.fromarray((image * 255).round().astype(np.uint8)).save(a.out)
print(f"wrote {a.out} and {a.latents}")
