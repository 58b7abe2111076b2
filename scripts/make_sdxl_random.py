#!/usr/bin/env python3
"""A full-size Stable Diffusion XL base 1.0 pipeline (diffusers layout, the real architecture and the
real CLIP BPE vocabulary from open_clip's bpe_simple_vocab_16e6.txt.gz) with RANDOM weights, for scale
checks of the Rust SDXL port: loading time, memory, generation and training speed at 1024 px. No hub
access: every config of stabilityai/stable-diffusion-xl-base-1.0 is written out below.

    python scripts/make_sdxl_random.py OUT [--dtype fp16|fp32]   # build (under /tmp only; ~6.9 GB in fp16)
    python scripts/make_sdxl_random.py --check-only              # instantiate on the meta device, count params

Parameter counts (checked by --check-only): UNet 2,567,463,684; text_encoder (CLIP ViT-L/14 text)
123,060,480; text_encoder_2 (OpenCLIP ViT-bigG/14 text + projection) 694,659,840; VAE 83,653,863.
fp16 files: UNet 5.14 GB, text_encoder_2 1.39 GB, text_encoder 0.25 GB, VAE 0.17 GB (~6.9 GB in all).

Memory: each component is created directly in the target dtype (torch default dtype switched while it
is built) and freed after saving, so the peak is about one UNet (5.2 GB in fp16, 10.3 GB in fp32).
Needs the open-clip-torch package only for its vocabulary file (pip install --no-deps open-clip-torch;
it is located, not imported).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import gc
import gzip
import importlib.util
import json
import shutil
import time

import torch

# ---------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0 configs (non-default values; everything else is the
# diffusers / transformers default, which is what the published config.json files contain)
# ---------------------------------------------------------------------------------------------
UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,  # 768 (CLIP-L) + 1280 (OpenCLIP-bigG)
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # = number of heads per level (head dim 64)
    dual_cross_attention=False,
    use_linear_projection=True,
    upcast_attention=None,
    resnet_time_scale_shift="default",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    addition_embed_type_num_heads=64,
    projection_class_embeddings_input_dim=2816,  # 6 * 256 + 1280
    conv_in_kernel=3,
    conv_out_kernel=3,
    time_embedding_type="positional",
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

TEXT_ENCODER_CONFIG = dict(  # openai/clip-vit-large-patch14 text tower, as shipped in SDXL text_encoder/
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    projection_dim=768,
    bos_token_id=0,  # legacy ids of the published config (eos_token_id 2 -> pooled at argmax(input_ids))
    eos_token_id=2,
    pad_token_id=1,
)

TEXT_ENCODER_2_CONFIG = dict(  # laion OpenCLIP ViT-bigG/14 text tower, SDXL text_encoder_2/
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    projection_dim=1280,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

SCHEDULER_CONFIG = {  # scheduler/scheduler_config.json verbatim
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

EXPECTED_PARAMS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863}


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_files(folder):
    """vocab.json + merges.txt of OpenAI CLIP (49408 ids) from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("needs the open-clip-torch package for its BPE file: pip install --no-deps open-clip-torch")
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")


def build_component(name, dtype, device=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        ctx = torch.device(device) if device else torch.device("cpu")
        with ctx:
            if name == "unet":
                return UNet2DConditionModel(**UNET_CONFIG)
            if name == "vae":
                return AutoencoderKL(**VAE_CONFIG)
            if name == "text_encoder":
                return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
            if name == "text_encoder_2":
                return CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG))
    finally:
        torch.set_default_dtype(old)
    raise ValueError(name)


def check_only():
    """Instantiate every component on the meta device (no memory, no init) and check the structure."""
    counts = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        t = time.time()
        m = build_component(name, torch.float32, device="meta")
        counts[name] = sum(p.numel() for p in m.parameters())
        print(f"{name:15s} {counts[name]:>14,d} params ({counts[name] * 2 / 1e9:.2f} GB fp16)  [{time.time() - t:.1f} s on meta]")
        if name == "unet":
            assert m.add_embedding.linear_1.in_features == 2816 == 6 * m.config.addition_time_embed_dim + 1280
            assert m.add_time_proj.num_channels == 256
            assert [len(b.attentions[0].transformer_blocks) if hasattr(b, "attentions") else 0 for b in m.down_blocks] == [0, 2, 10]
            assert len(m.mid_block.attentions[0].transformer_blocks) == 10
            assert [len(b.attentions[0].transformer_blocks) if hasattr(b, "attentions") else 0 for b in m.up_blocks] == [10, 2, 0]
            heads = [b.attentions[0].transformer_blocks[0].attn1.heads for b in m.down_blocks[1:]]
            assert heads == [10, 20], heads
        del m
    for k, v in EXPECTED_PARAMS.items():
        assert counts[k] == v, (k, counts[k], v)
    print(f"all parameter counts match SDXL base 1.0; total {sum(counts.values()):,d} "
          f"({sum(counts.values()) * 2 / 1e9:.2f} GB in fp16)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--check-only", action="store_true", help="meta-device instantiation + param counts; writes nothing")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--components", default="text_encoder,text_encoder_2,vae,unet",
                    help="comma list of the weight folders to build (a partial folder is not a loadable pipeline)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.check_only:
        check_only()
        return
    if not a.out:
        ap.error("OUT is required unless --check-only")
    out = os.path.abspath(a.out)
    if not out.startswith("/tmp/"):
        raise SystemExit(f"refusing to write {out}: build it under /tmp (about 7 GB in fp16, 14 GB in fp32)")
    dtype = torch.float16 if a.dtype == "fp16" else torch.float32
    need = sum(v for k, v in EXPECTED_PARAMS.items() if k in a.components.split(",")) * (2 if a.dtype == "fp16" else 4) * 1.02
    parent = os.path.dirname(out.rstrip("/")) or "/"
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need + 1e9:
        raise SystemExit(f"not enough disk under {parent}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB + 1 GB margin")

    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    vocab, merges = clip_vocab_files(os.path.join(out, "tokenizer"))
    tok = CLIPTokenizer(vocab, merges, model_max_length=77)
    assert len(tok) == 49408, len(tok)
    tok.save_pretrained(os.path.join(out, "tokenizer"))
    shutil.copytree(os.path.join(out, "tokenizer"), os.path.join(out, "tokenizer_2"), dirs_exist_ok=True)
    tok2 = CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!")
    tok2.save_pretrained(os.path.join(out, "tokenizer_2"))
    assert tok2.pad_token_id == 0
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2, sort_keys=True)

    wanted = set(a.components.split(","))
    for i, name in enumerate(("text_encoder", "text_encoder_2", "vae", "unet")):
        if name not in wanted:
            continue
        t = time.time()
        torch.manual_seed(1 + i)
        m = build_component(name, dtype).eval()
        n = sum(p.numel() for p in m.parameters())
        assert n == EXPECTED_PARAMS[name], (name, n)
        m.save_pretrained(os.path.join(out, name), safe_serialization=True)
        if name == "text_encoder":  # transformers 5 drops CLIPTextModel's "text_model." prefix; real SDXL files have it
            from safetensors.torch import load_file, save_file

            p = os.path.join(out, name, "model.safetensors")
            sd = load_file(p)
            save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}, p,
                      metadata={"format": "pt"})
        print(f"{name:15s} {n:>14,d} params, built + saved in {time.time() - t:.0f} s")
        del m
        gc.collect()
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out}: {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
