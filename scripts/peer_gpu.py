"""The PyTorch peer of `knobs bench --device cuda` on one GPU: a PEFT LoRA training step
(rank 4 on to_q/to_k/to_v/to_out.0, AdamW, batch B, prompt encoded each step as knobs does)
and one generation step (DDIM, CFG 7.5, VAE decode) at --resolution, median of --steps after
--warmup, fp32 unless --dtype says otherwise. Prints one JSON line per mode; the LoRA line
splits the step into the phases `knobs bench` reports (vae_encode timed apart; forward, which
is encode (the VAE and text encoder under no_grad) then unet_forward; backward; optimizer)
and each line the process's peak RSS so far. `--device cpu --threads N` makes it the CPU peer
of `knobs --threads N bench` (same steps, same sizes).

    python peer_gpu.py MODEL_DIR [--resolution 512] [--batch 1] [--steps 10] [--warmup 3] [--device cuda|cpu] [--tf32 default|on|off]
"""
import argparse, json, os, resource, statistics, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--resolution", type=int, default=512)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
p.add_argument("--device", default="cuda")
p.add_argument("--modes", default="generate,lora", help="which of generate, lora to time")
p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
p.add_argument("--tf32", default="default", choices=["default", "on", "off"],
               help="TF32 tensor cores for f32 matmuls and convolutions on the GPU (PyTorch's default: convolutions only)")
a = p.parse_args()
if a.tf32 != "default":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = a.tf32 == "on"
# What f32 work may round to TF32 here, for reading the f32 timings beside knobs'.
tf32 = {"matmul": torch.backends.cuda.matmul.allow_tf32, "conv": torch.backends.cudnn.allow_tf32}
dev = torch.device(a.device)
if a.threads:
    torch.set_num_threads(a.threads)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]


def timed(step):
    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t = time.perf_counter()
        step(i)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


t0 = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False).to(dev)
load_s = time.perf_counter() - t0
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)

modes = a.modes.split(",")
with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
    gen = None if "generate" not in modes else timed(lambda i: pipe("a photo of a sks dog", num_inference_steps=1, guidance_scale=7.5, height=a.resolution, width=a.resolution,
                               generator=torch.Generator(dev).manual_seed(i), output_type="np"))
if gen is not None:
    print(json.dumps({"peer": "diffusers", "mode": "generate", "median_s": gen, "resolution": a.resolution, "dtype": a.dtype, "tf32": tf32, "load_s": load_s,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))

unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
for m in (vae, te):
    m.requires_grad_(False)
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
images = torch.rand(a.batch, 3, a.resolution, a.resolution, device=dev) * 2 - 1


phases = {"vae_encode": [], "encode": [], "unet_forward": [], "forward": [], "backward": [], "optimizer": []}
steps = []


def train_step(i):
    marks = [time.perf_counter()]

    def mark():
        sync()
        marks.append(time.perf_counter())

    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
            ids = tok(["a photo of sks"] * a.batch, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids.to(dev)
            ctx = te(ids)[0]
        mark()
        noise = torch.randn_like(latents)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (a.batch,), device=dev)
        pred = unet(ddpm.add_noise(latents, noise, t), t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    mark()
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark()
    # knobs bench's phases: the VAE encode is timed on its own call, outside the step.
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        vae.encode(images)
    mark()
    if i >= a.warmup:
        for name, (s, e) in zip(["encode", "unet_forward", "backward", "optimizer", "vae_encode"], zip(marks, marks[1:])):
            phases[name].append(e - s)
        phases["forward"].append(marks[2] - marks[0])
        steps.append(marks[4] - marks[0])


if "lora" not in modes:
    raise SystemExit(0)
timed(train_step)
lora = statistics.median(steps)  # without the VAE encode timed apart
print(json.dumps({"peer": "peft", "mode": "lora", "median_s": lora, "resolution": a.resolution, "batch": a.batch, "dtype": a.dtype, "tf32": tf32,
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
                  # The process's peak so far (Linux counts KiB), as knobs bench's peak_rss_bytes.
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "phases": {k: statistics.median(v) for k, v in phases.items()}}))
