"""Times diffusers' StableDiffusionPipeline on a diffusers folder, the peer of `knobs generate`.

Usage: python bench_generate_diffusers.py MODEL_DIR [--steps 4] [--runs 5] [--threads 2]
    [--dtype fp32|bf16]  (bf16: the pipeline loaded with torch_dtype=torch.bfloat16, the peer of
    `knobs generate --mixed-precision bf16`)
Prints the median seconds of one text-to-image call (prompt + CFG + steps + VAE decode), after
one untimed call, and the seconds `from_pretrained` took.
"""
import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--steps", type=int, default=4)
p.add_argument("--runs", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
a = p.parse_args()
torch.set_num_threads(a.threads)
dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
start = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype)
load = time.perf_counter() - start
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
times = []
with torch.no_grad():
    for i in range(a.runs + 1):
        g = torch.Generator().manual_seed(i)
        t = time.perf_counter()
        pipe("a photo of a sks dog", num_inference_steps=a.steps, guidance_scale=7.5, generator=g, output_type="np")
        if i:
            times.append(time.perf_counter() - t)
print(f"diffusers generate: median {statistics.median(times):.3f} s over {a.runs} runs ({a.steps} steps, {a.threads} threads); load {load:.2f} s")
