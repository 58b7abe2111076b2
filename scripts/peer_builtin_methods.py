"""knobs' peer for `knobs bench --modes lora,dora,loha,lokr,oft,ia3` on the built-in model:
../shared/reference/bench_builtin.py with PEFT's DoRA, LoHa, LoKr and OFT added, configured as
`knobs train --method ...` configures them (rank 4, alpha 4, attention projections; OFT blocks
of 32).

The training step of `knobs train` on the built-in base model, in PyTorch + diffusers + PEFT:
VAE encode (frozen, no grad), noise, text encoder (frozen, no grad), UNet forward + backward,
AdamW. Same batch (4), same 32x32 images, same LoRA (r4, alpha 4, to_q/k/v/out.0) or full UNet.

    python scripts/peer_builtin_methods.py MODEL_DIR [--mode lora|dora|loha|lokr|oft|ia3|full] [--threads 1] [--steps 30] [--warmup 5]
prints: mode threads median_s_per_step peak_rss_mib
"""
import argparse, resource, statistics, time
import torch
from diffusers import StableDiffusionPipeline, DDPMScheduler
from peft import LoraConfig, IA3Config, LoHaConfig, LoKrConfig, OFTConfig, get_peft_model_state_dict
from peft import inject_adapter_in_model

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--mode", default="lora")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--res", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, torch_dtype=torch.float32)
unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
sched = DDPMScheduler.from_config(pipe.scheduler.config)
vae.requires_grad_(False); te.requires_grad_(False)
if a.mode == "full":
    params = list(unet.parameters())
else:
    unet.requires_grad_(False)
    attn = ["to_q", "to_k", "to_v", "to_out.0"]
    if a.mode == "lora":
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=attn))
    elif a.mode == "dora":
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=attn), unet)
    elif a.mode == "loha":
        inject_adapter_in_model(LoHaConfig(r=4, alpha=4, target_modules=attn), unet)
    elif a.mode == "lokr":
        inject_adapter_in_model(LoKrConfig(r=4, alpha=4, target_modules=attn), unet)
    elif a.mode == "oft":
        inject_adapter_in_model(OFTConfig(r=0, oft_block_size=32, target_modules=attn), unet)
    else:
        inject_adapter_in_model(IA3Config(target_modules=["to_k", "to_v", "ff.net.2"], feedforward_modules=["ff.net.2"]), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
res = a.res or (vae.config.sample_size if isinstance(vae.config.sample_size, int) else 32)
ids = tok(["a sks star"] * a.batch, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
imgs = torch.rand(a.batch, 3, res, res) * 2 - 1
times = []
for i in range(a.warmup + a.steps):
    t0 = time.perf_counter()
    with torch.no_grad():
        lat = vae.encode(imgs).latent_dist.sample() * vae.config.scaling_factor
        ctx = te(ids)[0]
    noise = torch.randn_like(lat)
    t = torch.randint(0, sched.config.num_train_timesteps, (a.batch,))
    noisy = sched.add_noise(lat, noise, t)
    pred = unet(noisy, t, ctx).sample
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
    loss = torch.nn.functional.mse_loss(pred, target)
    loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    if i >= a.warmup:
        times.append(time.perf_counter() - t0)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{a.mode} threads={a.threads} res={res} median_s={statistics.median(times):.4f} peak_rss_mib={rss:.0f} params={sum(p.numel() for p in params)}")
