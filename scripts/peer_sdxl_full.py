#!/usr/bin/env python3
"""The PyTorch peer of knobs on the full-size SDXL architecture (scripts/make_sdxl_random.py):

  --mode generate  StableDiffusionXLPipeline, 1024x1024, N Euler steps with guidance (negative
                   branch zeros, as without a negative prompt) and the VAE decode; fp32 weights
                   (the fp16 files widened, as `knobs generate` keeps them by default), or with
                   --dtype bf16 the pipeline loaded with torch_dtype=torch.bfloat16 (the peer of
                   `knobs generate --mixed-precision bf16`).
  --mode lora      one LoRA step (r=4 on to_q/k/v/out.0, AdamW) on the UNet at 1024 px (or
                   --resolution), batch 1, with cached latents and prompt embeddings (VAE and
                   text encoders not loaded), SDXL's added conditioning, optionally
                   `enable_gradient_checkpointing()`; with --dtype bf16 the forward and loss
                   under `torch.autocast("cpu", torch.bfloat16)` over fp32 weights (the peer of
                   `knobs bench --mixed-precision bf16`, as scripts/peer_gpu.py is at SD-1.5).

Prints load seconds, seconds per step (min over --steps, with its forward, backward and
optimizer parts) or per call, and peak RSS.

    python scripts/peer_sdxl_full.py /tmp/sdxl-full --mode generate [--steps 1] [--threads 2] [--dtype bf16]
    python scripts/peer_sdxl_full.py /tmp/sdxl-full --mode lora --checkpointing [--steps 2] [--dtype bf16]
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import resource
import time

import torch


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def generate(a):
    from diffusers import StableDiffusionXLPipeline

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(a.model, torch_dtype=dtype, local_files_only=True, add_watermarker=False)
    load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        pipe("a photo of a dog", num_inference_steps=a.steps, guidance_scale=7.5, height=1024, width=1024,
             generator=torch.Generator().manual_seed(0), output_type="np")
    call = time.perf_counter() - t0
    print(f"generate 1024x1024 {a.dtype}, {a.steps} step(s) + decode: load {load:.1f} s, call {call:.1f} s, peak RSS {peak_gib():.2f} GiB")


def lora(a):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from peft import LoraConfig

    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", torch_dtype=torch.float32, local_files_only=True)
    load = time.perf_counter() - t0
    sched = EulerDiscreteScheduler.from_pretrained(a.model, subfolder="scheduler", local_files_only=True)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [q for q in unet.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, a.resolution // 8, a.resolution // 8), generator=g)
    ehs = torch.randn((1, 77, 2048), generator=g)
    added = {"text_embeds": torch.randn((1, 1280), generator=g), "time_ids": torch.tensor([[float(a.resolution), float(a.resolution), 0.0, 0.0, float(a.resolution), float(a.resolution)]])}
    times, phases = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        ts = torch.randint(0, 1000, (1,), generator=g)
        noisy = latents + noise * ((1 - sched.alphas_cumprod[ts]) / sched.alphas_cumprod[ts]).sqrt().view(1, 1, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            pred = unet(noisy, ts, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        phases.append((t1 - t0, t2 - t1, times[-1] - (t2 - t0)))
    best = min(range(len(times)), key=times.__getitem__)
    split = ", ".join(f"{n} {s:.1f} s" for n, s in zip(["forward", "backward", "optimizer"], phases[best]))
    print(f"lora step {a.resolution} px {a.dtype} checkpointing={a.checkpointing}: load {load:.1f} s, {times[best]:.1f} s/step (min of {a.steps}; {split}), peak RSS {peak_gib():.2f} GiB")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--mode", choices=["generate", "lora"], required=True)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=1024, help="pixels (lora mode)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="generate: weights and compute; lora: the compute (autocast)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    generate(a) if a.mode == "generate" else lora(a)


if __name__ == "__main__":
    main()
