"""The PyTorch peer of `knobs train` at full size: one UNet training step at 512 px, batch 1,
as diffusers' training scripts run it with cached latents and text embeddings (the VAE and
text encoder are not in memory), with or without `enable_gradient_checkpointing()`.
Prints seconds per step and peak RSS.

    python scripts/peer_train_memory.py /tmp/sd15 --mode lora [--checkpointing] [--optimizer adamw|adamw8bit|adafactor]

Needs torch, diffusers, peft; bitsandbytes for adamw8bit, transformers for adafactor.
"""
import argparse, resource, time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "adafactor"], default="adamw")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import DDPMScheduler, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", torch_dtype=torch.float32, local_files_only=True)
    sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler", local_files_only=True)
    if a.mode == "lora":
        from peft import LoraConfig
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [q for q in unet.parameters() if q.requires_grad]
    if a.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=1e-5)
    elif a.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        opt = Adafactor(params, lr=1e-5, relative_step=False, scale_parameter=False)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4 if a.mode == "lora" else 1e-5)
    g = torch.Generator().manual_seed(0)
    side = a.resolution // 8
    latents = torch.randn((1, 4, side, side), generator=g)
    ehs = torch.randn((1, 77, unet.config.cross_attention_dim), generator=g)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        ts = torch.randint(0, 1000, (1,), generator=g)
        pred = unet(sched.add_noise(latents, noise, ts), ts, encoder_hidden_states=ehs).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"{a.mode} checkpointing={a.checkpointing} optimizer={a.optimizer}: {min(times):.1f} s/step (min of {a.steps}), peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
