#!/usr/bin/env python3
"""Tiny random-weight Stable Diffusion XL pipeline (diffusers layout) plus golden tensors made by
diffusers / PEFT, for numeric-parity tests of the Rust SDXL port.

Writes crates/knobs-diffusion/tests/fixtures/tiny-sdxl/ (see its README.md for the spec):

    model_index.json scheduler/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ unet/ vae/
    goldens/*.safetensors             inputs + outputs of every check (float32; token ids int64)
    goldens/lora/...                  the same LoRA in PEFT, diffusers and kohya files
    goldens/textual_inversion/...     an SDXL textual-inversion embedding (clip_l / clip_g)
    goldens/manifest.json             every golden tensor: shape, dtype; every adapter file's keys

Fully offline, CPU, float32, fixed seeds, one thread; the same bytes on every run (the script
re-executes itself with PYTHONHASHSEED=0 and sorts safetensors metadata).

Usage (from the repository root):
    /tmp/ref-venv/bin/python scripts/make_tiny_sdxl.py                 # build + goldens + verify
    /tmp/ref-venv/bin/python scripts/make_tiny_sdxl.py --verify-only   # reload from disk and re-check
Options: --out DIR (default: the fixture folder), --tokenizer-src DIR (default:
/work/shared/golden/tiny-sd/tokenizer, the tiny 1000-id CLIP-layout BPE of the SD-1.x fixture).
"""
import os
import sys

if os.environ.get("PYTHONHASHSEED") != "0":  # set-ordered config lists (target_modules) -> stable bytes
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import copy
import json
import re
import shutil
import struct

import torch

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO, "crates", "knobs-diffusion", "tests", "fixtures", "tiny-sdxl")
DEFAULT_TOKENIZER_SRC = "/work/shared/golden/tiny-sd/tokenizer"

# --------------------------------------------------------------------------------------------
# Configs (SDXL base 1.0 structure, tiny sizes). Real SDXL values are in scripts/make_sdxl_random.py.
# --------------------------------------------------------------------------------------------
TE1_HIDDEN, TE2_HIDDEN, TE2_PROJ = 16, 32, 24
ADD_TIME_DIM = 8

UNET_CONFIG = dict(
    sample_size=16,  # default height/width = sample_size * vae_scale_factor = 32 px
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(8, 16, 24),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    attention_head_dim=(1, 2, 3),  # diffusers: this is the NUMBER OF HEADS per level (head dim 8 everywhere)
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,  # 48 = te1 hidden 16 ++ te2 hidden 32
    use_linear_projection=True,
    upcast_attention=False,
    addition_embed_type="text_time",
    addition_time_embed_dim=ADD_TIME_DIM,
    projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + TE2_PROJ,  # 72
    norm_num_groups=4,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),  # -> vae_scale_factor 2
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.13025,
    force_upcast=True,
)

# bos/eos/pad ids 0/2/1 are the (legacy) values of the real SDXL text-encoder configs; eos_token_id == 2
# makes transformers pool at argmax(input_ids) instead of at the first eos (see README).
TE1_CONFIG = dict(
    vocab_size=1000,
    hidden_size=TE1_HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=16,  # unused by CLIPTextModel (SDXL's te1 config carries 768)
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
TE2_CONFIG = dict(
    vocab_size=1000,
    hidden_size=TE2_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=TE2_PROJ,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json, literally (keys that
# EulerDiscreteScheduler does not know -- clip_sample, set_alpha_to_one, skip_prk_steps,
# sample_max_value -- are ignored by diffusers).
SDXL_SCHEDULER_CONFIG = {
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

SCHEDULER_NOTE = """\
scheduler_config.json is stabilityai/stable-diffusion-xl-base-1.0's file verbatim.
EulerDiscreteScheduler uses: num_train_timesteps, beta_start, beta_end, beta_schedule (scaled_linear:
betas = linspace(sqrt(beta_start), sqrt(beta_end), 1000)^2 in float32), prediction_type (epsilon),
interpolation_type (linear), timestep_spacing (leading), steps_offset (1), use_karras_sigmas (false),
trained_betas (null). clip_sample, set_alpha_to_one, skip_prk_steps and sample_max_value are DDIM/PNDM
leftovers that diffusers ignores for Euler. Omitted keys take EulerDiscreteScheduler's defaults:
final_sigmas_type "zero", timestep_type "discrete", rescale_betas_zero_snr false, sigma_min/max null,
use_exponential_sigmas / use_beta_sigmas false. See ../README.md ("Scheduler") for the math.
"""

# --------------------------------------------------------------------------------------------
# Golden inputs
# --------------------------------------------------------------------------------------------
PROMPT = "a photo of a sks dog, high quality!"  # '!' is an added special token of tokenizer_2 (README)
PROMPT_2 = "an oil painting of a cat"
NEG = "blurry, dark"
TI_TOKEN = "<tiny-ti>"
TI_PROMPT = f"a photo of {TI_TOKEN} on the beach"
H, W = 32, 48  # pixels (height, width); latents 16 x 24
LAT_H, LAT_W = H // 2, W // 2
PIPE_KW = dict(
    height=H,
    width=W,
    num_inference_steps=3,
    guidance_scale=5.0,
    original_size=(96, 128),
    crops_coords_top_left=(8, 16),
    target_size=(64, 80),
)
UNET_TIME_IDS = [[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0], [96.0, 128.0, 8.0, 16.0, 64.0, 80.0]]
UNET_TIMESTEPS = [999.0, 37.0]

LORA_R, LORA_ALPHA = 2, 4  # scale alpha/r = 2
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LORA_B_STD = {"unet": 0.15, "text_encoder": 0.008, "text_encoder_2": 0.008}

MANIFEST = {"tensors": {}, "adapter_files": {}}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def quiet():
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=gen(seed), dtype=torch.float32) * scale


def canonicalize_safetensors(path):
    """Rewrite a safetensors header with sorted __metadata__ (safetensors writes it in hash order)."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=lambda kv: dict(kv))
    if "__metadata__" not in header:
        return
    md = dict(sorted(header["__metadata__"].items()))
    rest = {k: v for k, v in header.items() if k != "__metadata__"}
    new = json.dumps({"__metadata__": md, **rest}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert len(new) <= n, (path, len(new), n)
    new = new + b" " * (n - len(new))
    with open(path, "wb") as f:
        f.write(data[:8] + new + data[8 + n :])


def save_tensors(path, tensors, metadata=None):
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    canonicalize_safetensors(path)
    return tensors


def save_golden(out, name, tensors, meta=None):
    path = os.path.join(out, "goldens", name)
    md = {"golden": json.dumps(meta, sort_keys=True, default=str)} if meta else None
    tensors = save_tensors(path, tensors, md)
    MANIFEST["tensors"][name] = {
        "metadata": meta or {},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
    }


def st_keys(path):
    """Summary of an adapter file: count, dtypes, metadata, one example key (+ shape) per key pattern
    (digits -> N)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = sorted(f.keys())
        patterns = {}
        for k in keys:
            patterns.setdefault(re.sub(r"\d+", "N", k), [k, list(f.get_slice(k).get_shape())])
        return {
            "n_tensors": len(keys),
            "dtypes": sorted({str(f.get_slice(k).get_dtype()) for k in keys}),
            "metadata": f.metadata() or {},
            "key_patterns": dict(sorted(patterns.items())),
        }


def rel_err(a, b):
    """max |a-b| / max |b| (b = golden)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    den = b.abs().max().item()
    return (a - b).abs().max().item() / (den if den > 0 else 1.0)


def same(a, b, tol=1e-5):
    """equal up to float rounding (batch 1 vs batch 2 runs take different kernels)"""
    return a.shape == b.shape and rel_err(a, b) <= tol


def rel_change(a, b):
    return ((a - b).norm() / b.norm()).item()


def tokenize(tok, texts, max_length=77):
    return tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def load_pipe(out):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    return pipe


def unet_call(unet, sample, t, ehs, text_embeds, time_ids):
    return unet(sample, t, encoder_hidden_states=ehs,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample


# --------------------------------------------------------------------------------------------
# 1. build the pipeline folder
# --------------------------------------------------------------------------------------------
def build(out, tokenizer_src):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(2)
    te1 = CLIPTextModel(CLIPTextConfig(**TE1_CONFIG))
    torch.manual_seed(3)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CONFIG))
    tok1 = CLIPTokenizer.from_pretrained(tokenizer_src)
    tok2 = CLIPTokenizer.from_pretrained(tokenizer_src, pad_token="!")
    sched = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=te1.eval(), text_encoder_2=te2.eval(), tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet.eval(), scheduler=sched,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    if os.path.exists(out):
        keep = os.path.join(out, "README.md")
        readme = open(keep, encoding="utf-8").read() if os.path.exists(keep) else None
        shutil.rmtree(out)
        os.makedirs(out)
        if readme is not None:
            with open(keep, "w", encoding="utf-8") as f:
                f.write(readme)
    pipe.save_pretrained(out, safe_serialization=True)

    # scheduler: SDXL base's file verbatim + a note
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SDXL_SCHEDULER_CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "scheduler", "NOTE.md"), "w") as f:
        f.write(SCHEDULER_NOTE)

    # tokenizers: tokenizer/ = byte-identical copy of the source; tokenizer_2/ = same vocab with pad "!"
    for sub in ("tokenizer", "tokenizer_2"):
        d = os.path.join(out, sub)
        for fn in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tokenizer_src, fn), os.path.join(d, fn))
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_src, fn), os.path.join(out, "tokenizer", fn))
    cfg2_path = os.path.join(out, "tokenizer_2", "tokenizer_config.json")
    cfg2 = json.load(open(os.path.join(tokenizer_src, "tokenizer_config.json")))
    cfg2["pad_token"] = "!"
    with open(cfg2_path, "w") as f:
        json.dump(cfg2, f, indent=2, sort_keys=True)
        f.write("\n")

    # text_encoder: transformers 5 saves CLIPTextModel without the "text_model." prefix; real SDXL
    # text_encoder/model.safetensors (transformers 4 layout) has it -> write the real layout.
    p = os.path.join(out, "text_encoder", "model.safetensors")
    sd = load_file(p)
    assert not any(k.startswith("text_model.") for k in sd)
    save_tensors(p, {"text_model." + k: v for k, v in sd.items()}, {"format": "pt"})
    for root, _, files in os.walk(out):
        for fn in files:
            if fn.endswith(".safetensors"):
                canonicalize_safetensors(os.path.join(root, fn))

    # reload check: every weight comes back bit-identical
    pipe2 = load_pipe(out)
    for k in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, k).state_dict(), getattr(pipe2, k).state_dict()
        assert a.keys() == b.keys(), k
        assert all(torch.equal(a[x], b[x]) for x in a), k
    assert pipe2.tokenizer_2.pad_token_id == 0 and pipe2.tokenizer.pad_token_id == 999
    assert type(pipe2.scheduler).__name__ == "EulerDiscreteScheduler"
    n = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    print("built", out, "params:", n)
    return n


# --------------------------------------------------------------------------------------------
# kohya naming (documented in README "LoRA files")
# --------------------------------------------------------------------------------------------
def diffusers_unet_to_sgm(name, layers_per_block):
    """diffusers UNet module path -> the original SGM/LDM path kohya sd-scripts uses for SDXL.

    Only the modules inside Transformer2DModel blocks are needed here (LoRA targets):
      down_blocks.{b}.attentions.{j}.REST -> input_blocks.{1 + b*(lpb+1) + j}.1.REST
      mid_block.attentions.0.REST         -> middle_block.1.REST
      up_blocks.{b}.attentions.{j}.REST   -> output_blocks.{b*(lpb+1) + j}.1.REST
    REST (proj_in, transformer_blocks.N.attn1.to_q, ...ff.net.0.proj, ...) keeps its spelling.
    """
    n = layers_per_block + 1
    m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name)
    if m:
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name)
    if m:
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
    raise ValueError(f"no SGM name for {name}")


def te_module_name(component, name):
    """PEFT module name of a text encoder -> the transformers-4 / real-checkpoint spelling
    (text_model.encoder.layers.N...). transformers 5's CLIPTextModel has no text_model level."""
    if component == "text_encoder" and not name.startswith("text_model."):
        return "text_model." + name
    return name


def old_diffusers_keys(component, sd):
    """PEFT keys -> the pre-PEFT diffusers spelling: UNet MODULE.lora.down/up.weight, text encoders
    MODULE.lora_linear_layer.down/up.weight (order preserved)."""
    mid = ".lora." if component == "unet" else ".lora_linear_layer."
    return {k.replace(".lora_A.weight", mid + "down.weight").replace(".lora_B.weight", mid + "up.weight"): v
            for k, v in sd.items()}


def peft_modules(sd):
    """{module: (lora_A [r,in], lora_B [out,r])} from a PEFT state dict (keys MODULE.lora_A.weight)."""
    mods = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k)
        assert m, k
        mods.setdefault(m[1], {})[m[2]] = v
    return {k: (v["A"], v["B"]) for k, v in sorted(mods.items())}


def kohya_state_dict(peft_sds, alpha, layers_per_block, sgm=True):
    """peft_sds: {"unet": sd, "text_encoder": sd, "text_encoder_2": sd} -> kohya LoRA state dict."""
    out = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for comp, sd in peft_sds.items():
        for mod, (a, b) in peft_modules(sd).items():
            if comp == "unet":
                path = diffusers_unet_to_sgm(mod, layers_per_block) if sgm else mod
            else:
                path = te_module_name(comp, mod)
            name = prefixes[comp] + path.replace(".", "_")
            out[f"{name}.lora_down.weight"] = a
            out[f"{name}.lora_up.weight"] = b
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)  # 0-dim
    return out


# --------------------------------------------------------------------------------------------
# 2. goldens
# --------------------------------------------------------------------------------------------
def text_outputs(te1, te2, ids1, ids2):
    with torch.no_grad():
        o1 = te1(ids1, output_hidden_states=True)
        o2 = te2(ids2, output_hidden_states=True)
    return o1, o2


def encode(pipe, **kw):
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, **kw)
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": pp,
            "negative_pooled_prompt_embeds": npp}


def pipeline_run(pipe, latents, prompt=PROMPT, negative_prompt=NEG, capture=True):
    """Runs the golden pipeline call twice (output_type latent and np); returns tensors."""
    steps = {}
    hooks = []
    if capture:
        calls = []

        def hook(_m, args, kwargs, output):
            calls.append((args[0].detach().clone(), args[1].detach().clone() if torch.is_tensor(args[1]) else torch.tensor(args[1]),
                          kwargs["encoder_hidden_states"].detach().clone(),
                          {k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()},
                          output[0].detach().clone()))

        hooks.append(pipe.unet.register_forward_hook(hook, with_kwargs=True))
        step_lat = []

        def cb(_p, i, t, kw):
            step_lat.append(kw["latents"].detach().clone())
            return {}
    try:
        with torch.no_grad():
            kw = dict(prompt=prompt, negative_prompt=negative_prompt, latents=latents.clone(), **PIPE_KW)
            if capture:
                kw["callback_on_step_end"] = cb
            final_lat = pipe(**kw, output_type="latent").images
            if capture:
                n_steps = len(calls)
                kw.pop("callback_on_step_end")
            image = pipe(**kw, output_type="np").images
    finally:
        for h in hooks:
            h.remove()
    res = {"final_latents": final_lat, "image": torch.from_numpy(image)}
    if capture:
        for i in range(n_steps):
            x_in, t, ehs, added, eps = calls[i]
            steps[f"step{i}.timestep"] = t.reshape(()).float()
            steps[f"step{i}.unet_input"] = x_in
            steps[f"step{i}.noise_pred_uncond_cond"] = eps
            steps[f"step{i}.latents_after"] = step_lat[i]
        res.update(steps)
        res["cfg.prompt_embeds"] = calls[0][2]
        res["cfg.text_embeds"] = calls[0][3]["text_embeds"]
        res["cfg.time_ids"] = calls[0][3]["time_ids"]
    return res


def make_goldens(out):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    torch.use_deterministic_algorithms(True)
    pipe = load_pipe(out)
    tok1, tok2, te1, te2, unet, vae = pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae
    gdir = os.path.join(out, "goldens")
    if os.path.exists(gdir):
        shutil.rmtree(gdir)
    os.makedirs(gdir)

    # ------------------------------------------------------------ 1. text encoders
    prompts = [PROMPT, ""]
    ids1, ids2 = tokenize(tok1, prompts), tokenize(tok2, prompts)
    o1, o2 = text_outputs(te1, te2, ids1, ids2)
    pooled_idx = ids2.argmax(dim=-1)
    assert torch.equal(o2.text_embeds, te2.text_projection(o2.last_hidden_state[torch.arange(2), pooled_idx]))
    t = {
        "tok1_ids": ids1, "tok2_ids": ids2,
        "neg.tok1_ids": tokenize(tok1, [NEG]), "neg.tok2_ids": tokenize(tok2, [NEG]),
        "prompt_2.tok2_ids": tokenize(tok2, [PROMPT_2]),
        "te1.hidden_states_m2": o1.hidden_states[-2],
        "te1.hidden_states_m3": o1.hidden_states[-3],
        "te2.hidden_states_m2": o2.hidden_states[-2],
        "te2.hidden_states_m3": o2.hidden_states[-3],
        "te2.last_hidden_state": o2.last_hidden_state,
        "te2.pooled_index": pooled_idx,
        "te2.text_embeds": o2.text_embeds,
    }
    cases = {
        "neg": dict(prompt=PROMPT, negative_prompt=NEG),
        "zeros": dict(prompt=PROMPT, negative_prompt=None),
        "prompt_2": dict(prompt=PROMPT, prompt_2=PROMPT_2, negative_prompt=NEG),
        "clip_skip1": dict(prompt=PROMPT, negative_prompt=NEG, clip_skip=1),
    }
    enc = {}
    for name, kw in cases.items():
        enc[name] = encode(pipe, **kw)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    enc["nozeros"] = encode(pipe, prompt=PROMPT, negative_prompt=None)
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    keep = {"neg": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
            "zeros": ("negative_prompt_embeds", "negative_pooled_prompt_embeds"),
            "nozeros": ("negative_prompt_embeds", "negative_pooled_prompt_embeds"),
            "prompt_2": ("prompt_embeds", "pooled_prompt_embeds"),
            "clip_skip1": ("prompt_embeds", "negative_prompt_embeds")}
    for name, d in enc.items():  # outputs not stored for a case equal those of case "neg" (asserted below)
        for k, v in d.items():
            if k in keep[name]:
                t[f"encode.{name}.{k}"] = v
            else:
                assert torch.equal(v, enc["neg"][k]), (name, k)
    # the spec, asserted
    cat = lambda a, b: torch.cat([a, b], dim=-1)  # noqa: E731
    e = enc["neg"]
    assert same(e["prompt_embeds"][0], cat(o1.hidden_states[-2][0], o2.hidden_states[-2][0]))
    assert same(e["pooled_prompt_embeds"][0], o2.text_embeds[0])
    assert torch.equal(enc["zeros"]["negative_prompt_embeds"], torch.zeros(1, 77, TE1_HIDDEN + TE2_HIDDEN))
    assert torch.equal(enc["zeros"]["negative_pooled_prompt_embeds"], torch.zeros(1, TE2_PROJ))
    assert same(enc["nozeros"]["negative_prompt_embeds"][0], cat(o1.hidden_states[-2][1], o2.hidden_states[-2][1]))
    assert same(enc["nozeros"]["negative_pooled_prompt_embeds"][0], o2.text_embeds[1])
    assert same(enc["clip_skip1"]["prompt_embeds"][0], cat(o1.hidden_states[-3][0], o2.hidden_states[-3][0]))
    assert torch.equal(enc["clip_skip1"]["negative_prompt_embeds"], enc["neg"]["negative_prompt_embeds"])  # quirk
    assert same(enc["prompt_2"]["prompt_embeds"][0, :, :TE1_HIDDEN], o1.hidden_states[-2][0])
    save_golden(out, "text_encoders.safetensors", t, {
        "prompts": prompts, "negative_prompt": NEG, "prompt_2": PROMPT_2,
        "note": "ids: tokenizer(x, padding='max_length', max_length=77, truncation=True); row 0 = prompts[0], row 1 = '' . "
                "hidden_states_mK = output_hidden_states[-K] (no final layer norm). te2.text_embeds = text_projection("
                "final_layer_norm(last layer)[argmax(tok2_ids)]). encode.CASE.* = StableDiffusionXLPipeline.encode_prompt("
                "do_classifier_free_guidance=True) with: neg = (prompt, negative_prompt); zeros = (prompt, negative_prompt=None) "
                "with force_zeros_for_empty_prompt=True; nozeros = the same with force_zeros_for_empty_prompt=False; "
                "prompt_2 = (prompt, prompt_2, negative_prompt); clip_skip1 = (prompt, negative_prompt, clip_skip=1)"})
    print("text encoders: pooled index (argmax of tok2 ids)", pooled_idx.tolist())

    # ------------------------------------------------------------ 2. UNet
    sample = randn((2, 4, LAT_H, LAT_W), seed=11)
    timestep = torch.tensor(UNET_TIMESTEPS, dtype=torch.float32)
    ehs = torch.cat([e["prompt_embeds"], e["negative_prompt_embeds"]])  # [2, 77, 80]
    text_embeds = torch.cat([e["pooled_prompt_embeds"], e["negative_pooled_prompt_embeds"]])  # [2, 40]
    time_ids = torch.tensor(UNET_TIME_IDS, dtype=torch.float32)
    cap, hooks = {}, []

    def hook(name, want_input=False):
        def fn(_m, inp, outp):
            if want_input:
                cap[name + ".input"] = inp[0].detach().clone()
            o = outp[0] if isinstance(outp, tuple) else outp
            cap[name] = o.detach().clone()
        return fn

    named = {"time_proj": unet.time_proj, "time_embedding": unet.time_embedding, "add_time_proj": unet.add_time_proj,
             "conv_in": unet.conv_in, "mid_block": unet.mid_block}
    for i, b in enumerate(unet.down_blocks):
        named[f"down_blocks.{i}"] = b
    for i, b in enumerate(unet.up_blocks):
        named[f"up_blocks.{i}"] = b
    for n_, m in named.items():
        hooks.append(m.register_forward_hook(hook(n_)))
    hooks.append(unet.add_embedding.register_forward_hook(hook("add_embedding", want_input=True)))
    with torch.no_grad():
        unet_out = unet_call(unet, sample, timestep, ehs, text_embeds, time_ids)
    for h in hooks:
        h.remove()
    cap["emb"] = cap["time_embedding"] + cap["add_embedding"]
    assert cap["add_time_proj"].shape == (12, ADD_TIME_DIM)
    assert torch.equal(cap["add_embedding.input"], torch.cat([text_embeds, cap["add_time_proj"].reshape(2, -1)], dim=-1))
    save_golden(out, "unet.safetensors", {
        "sample": sample, "timestep": timestep, "encoder_hidden_states": ehs, "text_embeds": text_embeds,
        "time_ids": time_ids, "out": unet_out, **{f"intermediate.{k}": v for k, v in cap.items()}}, {
        "note": "out = unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={text_embeds, time_ids}).sample; "
                "ehs/text_embeds row 0 = encode.neg prompt, row 1 = its negative; time_ids rows = (orig_h, orig_w, crop_top, "
                "crop_left, target_h, target_w); intermediate.*: module outputs (first element of tuples), "
                "add_embedding.input = cat(text_embeds, add_time_proj(time_ids.flatten()).reshape(B,-1)), "
                "emb = time_embedding + add_embedding (the vector fed to every resnet)"})
    print(f"unet: out std {unet_out.std():.4f}")

    # ------------------------------------------------------------ 3. VAE
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    image = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy]).unsqueeze(0).clamp(-1, 1)  # [1,3,32,48]
    z = randn((1, 4, LAT_H, LAT_W), seed=12)
    with torch.no_grad():
        post = vae.encode(image).latent_dist
        moments = vae.quant_conv(vae.encoder(image))
        dec = vae.decode(z).sample
    save_golden(out, "vae.safetensors", {
        "encode_in": image, "encode_moments": moments, "encode_mean": post.mean, "encode_logvar": post.logvar,
        "encode_std": post.std, "decode_in": z, "decode_out": dec}, {
        "scaling_factor": vae.config.scaling_factor, "force_upcast": vae.config.force_upcast,
        "note": "encode_in in [-1,1] NCHW; moments = quant_conv(encoder(x)) = cat(mean, logvar) on C; logvar clamped to "
                "[-30,20]; std = exp(0.5*logvar); decode_out = vae.decode(decode_in).sample (no scaling applied: the pipeline "
                "decodes latents / scaling_factor; training latents = sample * scaling_factor)"})

    # ------------------------------------------------------------ 4. pipeline
    lat = randn((1, 4, LAT_H, LAT_W), seed=13)
    res = pipeline_run(pipe, lat)
    sch = pipe.scheduler
    add_time_ids = pipe._get_add_time_ids(PIPE_KW["original_size"], PIPE_KW["crops_coords_top_left"], PIPE_KW["target_size"],
                                          dtype=torch.float32, text_encoder_projection_dim=TE2_PROJ)
    assert torch.equal(res["cfg.time_ids"], add_time_ids.repeat(2, 1))
    assert torch.equal(res["cfg.prompt_embeds"], torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]]))
    save_golden(out, "pipeline.safetensors", {
        "latents": lat, "scheduler.timesteps": sch.timesteps.clone(), "scheduler.sigmas": sch.sigmas.clone(),
        "scheduler.init_noise_sigma": torch.tensor(float(sch.init_noise_sigma)),
        "scheduler.alphas_cumprod": sch.alphas_cumprod.clone(), "add_time_ids": add_time_ids, **res}, {
        "call": dict(prompt=PROMPT, negative_prompt=NEG, **PIPE_KW, latents="latents", generator=None),
        "note": "StableDiffusionXLPipeline(**call): final_latents = output_type='latent' (before /scaling_factor), "
                "image = output_type='np' ([1,H,W,3] in [0,1], float32); cfg.* = UNet inputs (batch [negative, "
                "positive]); stepI.unet_input = scale_model_input(cat([x,x]), t); stepI.noise_pred_uncond_cond = raw UNet "
                "output before guidance; stepI.latents_after = latents after scheduler.step"})
    print(f"pipeline: timesteps {sch.timesteps.tolist()} sigmas {[round(float(s), 4) for s in sch.sigmas]} "
          f"init_noise_sigma {float(sch.init_noise_sigma):.5f}")

    # ------------------------------------------------------------ 5. LoRA
    cfgs = {
        "unet": LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS),
        "text_encoder": LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=TE_LORA_TARGETS),
        "text_encoder_2": LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=TE_LORA_TARGETS),
    }
    bases = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    peft_models, peft_sds = {}, {}
    for i, (comp, cfg) in enumerate(cfgs.items()):
        torch.manual_seed(100 + 2 * i)
        pm = get_peft_model(copy.deepcopy(bases[comp]), copy.deepcopy(cfg))  # lora_A ~ N(0, 1/r^2)
        g = gen(101 + 2 * i)
        with torch.no_grad():
            for n_, p in pm.named_parameters():
                if "lora_B" in n_:
                    p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD[comp])
        pm.eval()
        peft_models[comp] = pm
        peft_sds[comp] = {k.removeprefix("base_model.model."): v.clone()
                          for k, v in get_peft_model_state_dict(pm).items()}
    # reference outputs (in-memory PEFT models)
    with torch.no_grad():
        ref_unet = peft_models["unet"](sample, timestep, encoder_hidden_states=ehs,
                                       added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        r1 = peft_models["text_encoder"](ids1, output_hidden_states=True)
        r2 = peft_models["text_encoder_2"](ids2, output_hidden_states=True)
    changes = {"unet": rel_change(ref_unet, unet_out), "te1.hidden_states_m2": rel_change(r1.hidden_states[-2], o1.hidden_states[-2]),
               "te2.hidden_states_m2": rel_change(r2.hidden_states[-2], o2.hidden_states[-2]),
               "te2.text_embeds": rel_change(r2.text_embeds, o2.text_embeds)}
    print("lora relative change |lora-base|/|base|:", {k: round(v, 4) for k, v in changes.items()})
    for k, v in changes.items():
        assert 0.05 <= v <= 0.5, (k, v)

    ldir = os.path.join(gdir, "lora")
    # (a) PEFT folders, one per component
    for comp, pm in peft_models.items():
        d = os.path.join(ldir, "peft", comp)
        pm.save_pretrained(d, safe_serialization=True)
        if os.path.exists(os.path.join(d, "README.md")):
            os.remove(os.path.join(d, "README.md"))
        cj = os.path.join(d, "adapter_config.json")  # transformers models record their local path here
        c = json.load(open(cj))
        c["base_model_name_or_path"] = None
        with open(cj, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
        canonicalize_safetensors(os.path.join(d, "adapter_model.safetensors"))
    # (b) diffusers save_lora_weights, two key spellings, both with the LoraConfig metadata (needed: alpha != r):
    #     diffusers/          PEFT keys:        unet.MODULE.lora_A.weight, text_encoder.text_model....lora_A.weight
    #     diffusers_old_keys/ old diffusers:    unet.MODULE.lora.down.weight, text_encoder....lora_linear_layer.down.weight
    #     (the old spelling is what convert_state_dict_to_diffusers gives for the default targets to_q/k/v/out.0 and
    #     q/k/v/out_proj, applied here to every module; see README for why a mixed file must not be written).
    meta = {comp: json.loads(json.dumps(cfg.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
            for comp, cfg in cfgs.items()}
    te_sd = lambda comp: {te_module_name(comp, k): v for k, v in peft_sds[comp].items()}  # noqa: E731
    layers = {"unet": peft_sds["unet"], "text_encoder": te_sd("text_encoder"), "text_encoder_2": te_sd("text_encoder_2")}
    old = {comp: old_diffusers_keys(comp, sd) for comp, sd in layers.items()}
    for comp, sd in layers.items():  # the old spelling agrees with diffusers' converter where that converter acts
        conv = convert_state_dict_to_diffusers(sd)
        for k_new, k_old in zip(sd, old[comp]):
            if k_new not in conv:  # converted by diffusers
                assert k_old in conv, (k_new, k_old)
    ddir = os.path.join(ldir, "diffusers")
    ddir_old = os.path.join(ldir, "diffusers_old_keys")
    for d, sds in ((ddir, layers), (ddir_old, old)):
        StableDiffusionXLPipeline.save_lora_weights(
            d, unet_lora_layers=sds["unet"], text_encoder_lora_layers=sds["text_encoder"],
            text_encoder_2_lora_layers=sds["text_encoder_2"],
            unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta["text_encoder"],
            text_encoder_2_lora_adapter_metadata=meta["text_encoder_2"], safe_serialization=True)
        canonicalize_safetensors(os.path.join(d, "pytorch_lora_weights.safetensors"))
    # (c) kohya: sd-scripts' SDXL naming (SGM block names) and the diffusers-block-name variant
    kdir = os.path.join(ldir, "kohya")
    kmeta = {"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_R), "ss_network_alpha": str(float(LORA_ALPHA)),
             "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    k_sgm = os.path.join(kdir, "tiny_sdxl_lora_kohya.safetensors")
    k_dif = os.path.join(kdir, "tiny_sdxl_lora_kohya_diffusers_names.safetensors")
    save_tensors(k_sgm, kohya_state_dict(peft_sds, LORA_ALPHA, UNET_CONFIG["layers_per_block"], sgm=True), kmeta)
    kd = kohya_state_dict(peft_sds, LORA_ALPHA, UNET_CONFIG["layers_per_block"], sgm=False)
    save_tensors(k_dif, kd, kmeta)
    # cross-check the diffusers-name variant against diffusers' own convert_state_dict_to_kohya (which writes alpha = r)
    from diffusers.utils import convert_state_dict_to_kohya

    ck = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in peft_sds["unet"].items()},
                                      **{f"text_encoder.{k}": v for k, v in te_sd("text_encoder").items()},
                                      **{f"text_encoder_2.{k}": v for k, v in te_sd("text_encoder_2").items()}})
    assert ck.keys() == kd.keys(), sorted(set(ck) ^ set(kd))[:5]
    assert all(torch.equal(ck[k].float(), kd[k]) for k in kd if not k.endswith(".alpha"))
    print(f"kohya (diffusers names) == diffusers.utils.convert_state_dict_to_kohya keys ({len(kd)}); "
          f"its alpha is int64 r={int(next(v for k, v in ck.items() if k.endswith('.alpha')))} (ours {LORA_ALPHA}.0)")

    # load every file back and compare with the in-memory PEFT reference
    def lora_pipe(path, **kw):
        p = load_pipe(out)
        p.load_lora_weights(path, **kw)
        return p

    ref = {"unet": ref_unet, "te1": r1.hidden_states[-2], "te2": r2.hidden_states[-2], "te2.text_embeds": r2.text_embeds}

    def outputs_of(p):
        with torch.no_grad():
            a = unet_call(p.unet, sample, timestep, ehs, text_embeds, time_ids)
            q1 = p.text_encoder(ids1, output_hidden_states=True)
            q2 = p.text_encoder_2(ids2, output_hidden_states=True)
        return {"unet": a, "te1": q1.hidden_states[-2], "te2": q2.hidden_states[-2], "te2.text_embeds": q2.text_embeds}

    checks = {}
    lp = {"diffusers": lora_pipe(ddir), "diffusers_old_keys": lora_pipe(ddir_old), "kohya_sgm": lora_pipe(k_sgm), "kohya_diffusers_names": lora_pipe(k_dif)}
    for name, p in lp.items():
        o = outputs_of(p)
        checks[name] = {k: rel_err(o[k], ref[k]) for k in ref}
    for comp, base in bases.items():
        pm2 = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(ldir, "peft", comp)).eval()
        with torch.no_grad():
            if comp == "unet":
                o = unet_call(pm2, sample, timestep, ehs, text_embeds, time_ids)
                checks[f"peft/{comp}"] = {"unet": rel_err(o, ref["unet"])}
            else:
                q = pm2(ids1 if comp == "text_encoder" else ids2, output_hidden_states=True)
                key = "te1" if comp == "text_encoder" else "te2"
                checks[f"peft/{comp}"] = {key: rel_err(q.hidden_states[-2], ref[key])}
    for name, c in checks.items():
        print(f"  LoRA file {name:24s} max rel err vs PEFT reference: " + ", ".join(f"{k} {v:.2e}" for k, v in c.items()))
        assert all(v < 1e-5 for v in c.values()), (name, c)

    # golden outputs with the LoRA, computed by diffusers from the diffusers file
    pd = lp["diffusers"]
    el = encode(pd, prompt=PROMPT, negative_prompt=NEG)
    assert same(el["prompt_embeds"][0], cat(*[x[0] for x in outputs_of(pd).values()][1:3]))
    res_l = pipeline_run(pd, lat, capture=False)
    res_k = pipeline_run(lp["kohya_sgm"], lat, capture=False)
    res_kd = pipeline_run(lp["kohya_diffusers_names"], lat, capture=False)
    pk = {"kohya_sgm": rel_err(res_k["final_latents"], res_l["final_latents"]),
          "kohya_diffusers_names": rel_err(res_kd["final_latents"], res_l["final_latents"]),
          "kohya_sgm image": rel_err(res_k["image"], res_l["image"])}
    print("  LoRA pipeline, kohya vs diffusers file, max rel err:", {k: f"{v:.2e}" for k, v in pk.items()})
    assert all(v < 1e-5 for v in pk.values())
    print(f"  LoRA pipeline image change vs base: {rel_change(res_l['image'], res['image']):.4f}")
    save_golden(out, "lora.safetensors", {
        "sample": sample, "timestep": timestep, "encoder_hidden_states": ehs, "text_embeds": text_embeds, "time_ids": time_ids,
        "unet_out_base": unet_out, "unet_out_lora": ref_unet,
        "tok1_ids": ids1, "tok2_ids": ids2,
        "te1.hidden_states_m2": r1.hidden_states[-2], "te2.hidden_states_m2": r2.hidden_states[-2],
        "te2.text_embeds": r2.text_embeds,
        **{f"encode.neg.{k}": v for k, v in el.items()},
        "pipeline.latents": lat, "pipeline.final_latents": res_l["final_latents"], "pipeline.image": res_l["image"]}, {
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "scale": LORA_ALPHA / LORA_R, "unet_targets": UNET_LORA_TARGETS,
                 "text_encoder_targets": TE_LORA_TARGETS, "lora_B_std": LORA_B_STD},
        "files": ["lora/peft/{unet,text_encoder,text_encoder_2}", "lora/diffusers/pytorch_lora_weights.safetensors",
                  "lora/diffusers_old_keys/pytorch_lora_weights.safetensors",
                  "lora/kohya/tiny_sdxl_lora_kohya.safetensors", "lora/kohya/tiny_sdxl_lora_kohya_diffusers_names.safetensors"],
        "note": "W' = W + (alpha/r) * B @ A on every targeted Linear (unet and both text encoders); unet_* use the same "
                "inputs as unet.safetensors; te* use the same ids as text_encoders.safetensors; encode.neg.* and "
                "pipeline.* = the pipeline.safetensors call with the LoRA loaded (load_lora_weights of the diffusers file)"})
    for rel in ["lora/peft/unet/adapter_model.safetensors", "lora/peft/text_encoder/adapter_model.safetensors",
                "lora/peft/text_encoder_2/adapter_model.safetensors", "lora/diffusers/pytorch_lora_weights.safetensors",
                "lora/diffusers_old_keys/pytorch_lora_weights.safetensors",
                "lora/kohya/tiny_sdxl_lora_kohya.safetensors", "lora/kohya/tiny_sdxl_lora_kohya_diffusers_names.safetensors"]:
        MANIFEST["adapter_files"][rel] = st_keys(os.path.join(gdir, rel))

    # ------------------------------------------------------------ 6. textual inversion (SDXL: clip_l + clip_g)
    ti_path = os.path.join(gdir, "textual_inversion", "tiny-ti.safetensors")
    emb_l, emb_g = randn((1, TE1_HIDDEN), seed=200, scale=0.05), randn((1, TE2_HIDDEN), seed=201, scale=0.05)
    save_tensors(ti_path, {"clip_l": emb_l, "clip_g": emb_g})
    pt = load_pipe(out)
    st = load_file(ti_path)
    pt.load_textual_inversion(st["clip_l"], token=TI_TOKEN, text_encoder=pt.text_encoder, tokenizer=pt.tokenizer)
    pt.load_textual_inversion(st["clip_g"], token=TI_TOKEN, text_encoder=pt.text_encoder_2, tokenizer=pt.tokenizer_2)
    tid1, tid2 = tokenize(pt.tokenizer, [TI_PROMPT]), tokenize(pt.tokenizer_2, [TI_PROMPT])
    assert pt.tokenizer.convert_tokens_to_ids(TI_TOKEN) == 1000 == pt.tokenizer_2.convert_tokens_to_ids(TI_TOKEN)
    q1, q2 = text_outputs(pt.text_encoder, pt.text_encoder_2, tid1, tid2)
    et = encode(pt, prompt=TI_PROMPT, negative_prompt=NEG)
    ti_pos = int((tid2[0] == 1000).nonzero()[0])
    eos_pos = int((tid2[0] == 999).nonzero()[0])
    pooled_at_eos = pt.text_encoder_2.text_projection(q2.last_hidden_state[0, eos_pos])[None]
    assert int(tid2[0].argmax()) == ti_pos
    assert same(et["pooled_prompt_embeds"], q2.text_embeds)
    assert same(et["prompt_embeds"][0], cat(q1.hidden_states[-2][0], q2.hidden_states[-2][0]))
    print(f"textual inversion: ids {tid1[0, :10].tolist()}..., te2 pools at index {ti_pos} (the TI token, argmax) not the "
          f"eos at {eos_pos}; change vs no-TI prompt embeds computed")
    save_golden(out, "textual_inversion.safetensors", {
        "clip_l": emb_l, "clip_g": emb_g, "tok1_ids": tid1, "tok2_ids": tid2,
        "te1.hidden_states_m2": q1.hidden_states[-2], "te2.hidden_states_m2": q2.hidden_states[-2],
        "te2.text_embeds": q2.text_embeds, "te2.pooled_index": tid2.argmax(dim=-1),
        "te2.text_embeds_if_pooled_at_eos": pooled_at_eos,
        **{f"encode.neg.{k}": v for k, v in et.items()}}, {
        "token": TI_TOKEN, "prompt": TI_PROMPT, "negative_prompt": NEG, "file": "textual_inversion/tiny-ti.safetensors",
        "loading": "pipe.load_textual_inversion(sd['clip_l'], token=TOKEN, text_encoder=pipe.text_encoder, "
                   "tokenizer=pipe.tokenizer); pipe.load_textual_inversion(sd['clip_g'], token=TOKEN, "
                   "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
        "note": f"the token gets id 1000 (= old vocab size) in both tokenizers; te2 pools at argmax(ids) = the TI token "
                f"(index {ti_pos}), not at the eos ({eos_pos}); te2.text_embeds_if_pooled_at_eos is NOT what diffusers "
                f"returns (for reference only)"})

    with open(os.path.join(gdir, "manifest.json"), "w") as f:
        json.dump(MANIFEST, f, indent=1, sort_keys=True, default=str)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# 3. verify: reload everything from disk and recompute each golden
# --------------------------------------------------------------------------------------------
def verify(out):
    from peft import PeftModel
    from safetensors.torch import load_file

    torch.use_deterministic_algorithms(True)
    G = lambda name: load_file(os.path.join(out, "goldens", name))  # noqa: E731
    rows = []

    def rep(what, a, b, tol=1e-5):
        e = rel_err(a, b)
        rows.append((what, e))
        print(f"  {what:60s} max rel err {e:.2e}")
        assert e <= tol, (what, e)

    pipe = load_pipe(out)
    # text encoders
    g = G("text_encoders.safetensors")
    assert torch.equal(tokenize(pipe.tokenizer, [PROMPT, ""]), g["tok1_ids"])
    assert torch.equal(tokenize(pipe.tokenizer_2, [PROMPT, ""]), g["tok2_ids"])
    assert torch.equal(tokenize(pipe.tokenizer_2, [NEG]), g["neg.tok2_ids"])
    o1, o2 = text_outputs(pipe.text_encoder, pipe.text_encoder_2, g["tok1_ids"], g["tok2_ids"])
    rep("text_encoders te1.hidden_states_m2", o1.hidden_states[-2], g["te1.hidden_states_m2"])
    rep("text_encoders te2.hidden_states_m2", o2.hidden_states[-2], g["te2.hidden_states_m2"])
    rep("text_encoders te2.text_embeds", o2.text_embeds, g["te2.text_embeds"])
    e = encode(pipe, prompt=PROMPT, negative_prompt=NEG)
    for k, v in e.items():
        rep(f"text_encoders encode.neg.{k}", v, g[f"encode.neg.{k}"])
    e = encode(pipe, prompt=PROMPT, prompt_2=PROMPT_2, negative_prompt=NEG)
    rep("text_encoders encode.prompt_2.prompt_embeds", e["prompt_embeds"], g["encode.prompt_2.prompt_embeds"])
    # unet
    g = G("unet.safetensors")
    with torch.no_grad():
        o = unet_call(pipe.unet, g["sample"], g["timestep"], g["encoder_hidden_states"], g["text_embeds"], g["time_ids"])
    rep("unet out", o, g["out"])
    # vae
    g = G("vae.safetensors")
    with torch.no_grad():
        post = pipe.vae.encode(g["encode_in"]).latent_dist
        rep("vae encode_mean", post.mean, g["encode_mean"])
        rep("vae encode_std", post.std, g["encode_std"])
        rep("vae decode_out", pipe.vae.decode(g["decode_in"]).sample, g["decode_out"])
    # pipeline
    g = G("pipeline.safetensors")
    res = pipeline_run(pipe, g["latents"], capture=False)
    rep("pipeline final_latents", res["final_latents"], g["final_latents"])
    rep("pipeline image", res["image"], g["image"])
    # LoRA files
    g = G("lora.safetensors")
    ldir = os.path.join(out, "goldens", "lora")
    for name, path in [("diffusers", os.path.join(ldir, "diffusers")),
                       ("diffusers_old_keys", os.path.join(ldir, "diffusers_old_keys")),
                       ("kohya_sgm", os.path.join(ldir, "kohya", "tiny_sdxl_lora_kohya.safetensors")),
                       ("kohya_diffusers_names", os.path.join(ldir, "kohya", "tiny_sdxl_lora_kohya_diffusers_names.safetensors"))]:
        p = load_pipe(out)
        p.load_lora_weights(path)
        with torch.no_grad():
            o = unet_call(p.unet, g["sample"], g["timestep"], g["encoder_hidden_states"], g["text_embeds"], g["time_ids"])
            q1, q2 = text_outputs(p.text_encoder, p.text_encoder_2, g["tok1_ids"], g["tok2_ids"])
        rep(f"lora[{name}] unet_out_lora", o, g["unet_out_lora"])
        rep(f"lora[{name}] te1.hidden_states_m2", q1.hidden_states[-2], g["te1.hidden_states_m2"])
        rep(f"lora[{name}] te2.hidden_states_m2", q2.hidden_states[-2], g["te2.hidden_states_m2"])
        rep(f"lora[{name}] te2.text_embeds", q2.text_embeds, g["te2.text_embeds"])
        el = encode(p, prompt=PROMPT, negative_prompt=NEG)
        rep(f"lora[{name}] encode.neg.prompt_embeds", el["prompt_embeds"], g["encode.neg.prompt_embeds"])
        r = pipeline_run(p, g["pipeline.latents"], capture=False)
        rep(f"lora[{name}] pipeline.image", r["image"], g["pipeline.image"])
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        base = copy.deepcopy(getattr(pipe, comp))
        pm = PeftModel.from_pretrained(base, os.path.join(ldir, "peft", comp)).eval()
        with torch.no_grad():
            if comp == "unet":
                rep("lora[peft/unet] unet_out_lora", unet_call(pm, g["sample"], g["timestep"], g["encoder_hidden_states"],
                                                               g["text_embeds"], g["time_ids"]), g["unet_out_lora"])
            else:
                ids = g["tok1_ids"] if comp == "text_encoder" else g["tok2_ids"]
                key = "te1" if comp == "text_encoder" else "te2"
                rep(f"lora[peft/{comp}] {key}.hidden_states_m2", pm(ids, output_hidden_states=True).hidden_states[-2],
                    g[f"{key}.hidden_states_m2"])
    # textual inversion
    g = G("textual_inversion.safetensors")
    pt = load_pipe(out)
    st = load_file(os.path.join(out, "goldens", "textual_inversion", "tiny-ti.safetensors"))
    pt.load_textual_inversion(st["clip_l"], token=TI_TOKEN, text_encoder=pt.text_encoder, tokenizer=pt.tokenizer)
    pt.load_textual_inversion(st["clip_g"], token=TI_TOKEN, text_encoder=pt.text_encoder_2, tokenizer=pt.tokenizer_2)
    assert torch.equal(tokenize(pt.tokenizer, [TI_PROMPT]), g["tok1_ids"])
    assert torch.equal(tokenize(pt.tokenizer_2, [TI_PROMPT]), g["tok2_ids"])
    et = encode(pt, prompt=TI_PROMPT, negative_prompt=NEG)
    for k, v in et.items():
        rep(f"textual_inversion encode.neg.{k}", v, g[f"encode.neg.{k}"])
    print(f"verify: {len(rows)} comparisons, worst max rel err {max(e for _, e in rows):.2e}")
    return rows


def spec_check(out):
    """Independent re-implementation of the SDXL-specific math the README states, checked against the goldens."""
    import math

    import numpy as np
    from safetensors.torch import load_file

    G = lambda name: load_file(os.path.join(out, "goldens", name))  # noqa: E731
    pipe = load_pipe(out)
    unet, te2, vae = pipe.unet, pipe.text_encoder_2, pipe.vae
    errs = {}
    # pooled = text_projection(final_layer_norm(h_last)[argmax(ids)])
    g = G("text_encoders.safetensors")
    idx = g["tok2_ids"].argmax(-1)
    pooled = g["te2.last_hidden_state"][torch.arange(2), idx] @ te2.text_projection.weight.T
    errs["pooled = text_projection(last_hidden_state[argmax ids])"] = rel_err(pooled, g["te2.text_embeds"])
    pe = torch.cat([g["te1.hidden_states_m2"][:1], g["te2.hidden_states_m2"][:1]], -1)
    errs["prompt_embeds = cat(te1 h[-2], te2 h[-2])"] = rel_err(pe, g["encode.neg.prompt_embeds"])

    # sinusoidal embedding: half = d/2, f_i = exp(-ln(10000) * i / half), emb = [cos(v f), sin(v f)]
    def sincos(v, d):
        half = d // 2
        f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = v.float()[:, None] * f[None]
        return torch.cat([torch.cos(a), torch.sin(a)], -1)

    def mlp(m, x):
        return m.linear_2(torch.nn.functional.silu(m.linear_1(x)))

    g = G("unet.safetensors")
    with torch.no_grad():
        tp = sincos(g["time_ids"].flatten(), ADD_TIME_DIM)
        errs["add_time_proj = sincos(time_ids.flatten(), 8)"] = rel_err(tp, g["intermediate.add_time_proj"])
        add_in = torch.cat([g["text_embeds"], tp.reshape(2, -1)], -1)
        aug = mlp(unet.add_embedding, add_in)
        errs["add_embedding(cat(text_embeds, time proj))"] = rel_err(aug, g["intermediate.add_embedding"])
        temb = mlp(unet.time_embedding, sincos(g["timestep"], UNET_CONFIG["block_out_channels"][0]))
        errs["time_embedding(sincos(t, 8))"] = rel_err(temb, g["intermediate.time_embedding"])
        errs["emb = temb + aug"] = rel_err(temb + aug, g["intermediate.emb"])

    # Euler (leading, steps_offset 1) + CFG + postprocess
    g = G("pipeline.safetensors")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    acp = torch.cumprod(1.0 - betas, 0)
    n = PIPE_KW["num_inference_steps"]
    ts = (np.arange(0, n) * (1000 // n)).round()[::-1].astype(np.float32) + 1
    sig_all = ((1 - acp) / acp) ** 0.5
    sig = np.interp(ts, np.arange(1000), sig_all.numpy())
    sig = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    errs["scheduler.timesteps"] = rel_err(torch.from_numpy(ts.copy()), g["scheduler.timesteps"])
    errs["scheduler.sigmas"] = rel_err(sig, g["scheduler.sigmas"])
    init = float((sig.max() ** 2 + 1) ** 0.5)
    errs["init_noise_sigma = sqrt(max sigma^2 + 1)"] = abs(init - float(g["scheduler.init_noise_sigma"])) / init
    th = [PIPE_KW["original_size"][0], PIPE_KW["original_size"][1], *PIPE_KW["crops_coords_top_left"], *PIPE_KW["target_size"]]
    errs["time_ids = (orig h, w, crop top, left, target h, w)"] = rel_err(torch.tensor([th, th], dtype=torch.float32), g["cfg.time_ids"])
    x = g["latents"] * init
    for i in range(n):
        errs[f"step{i} unet_input = cat(x,x)/sqrt(sigma^2+1)"] = rel_err(torch.cat([x, x]) / (sig[i] ** 2 + 1) ** 0.5, g[f"step{i}.unet_input"])
        u, c = g[f"step{i}.noise_pred_uncond_cond"].chunk(2)
        eps = u + PIPE_KW["guidance_scale"] * (c - u)
        x0 = x - sig[i] * eps
        x = x + (x - x0) / sig[i] * (sig[i + 1] - sig[i])
        errs[f"step{i} euler step"] = rel_err(x, g[f"step{i}.latents_after"])
    errs["final_latents"] = rel_err(x, g["final_latents"])
    with torch.no_grad():
        img = (vae.decode(g["final_latents"] / VAE_CONFIG["scaling_factor"]).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    errs["image = clamp(decode(lat/0.13025)/2+0.5) NHWC"] = rel_err(img, g["image"])

    # kohya file merged by hand: W += (alpha / r) * up @ down, module found by forward-mapping every module name
    g = G("lora.safetensors")
    kfile = load_file(os.path.join(out, "goldens", "lora", "kohya", "tiny_sdxl_lora_kohya.safetensors"))
    u2, t1, t2 = copy.deepcopy(unet), copy.deepcopy(pipe.text_encoder), copy.deepcopy(te2)
    table = {}
    for name, mod in u2.named_modules():
        if isinstance(mod, torch.nn.Linear):
            try:
                table["lora_unet_" + diffusers_unet_to_sgm(name, UNET_CONFIG["layers_per_block"]).replace(".", "_")] = mod
            except ValueError:
                pass
    for comp, model, pre in (("text_encoder", t1, "lora_te1_"), ("text_encoder_2", t2, "lora_te2_")):
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                table[pre + te_module_name(comp, name).replace(".", "_")] = mod
    merged = 0
    with torch.no_grad():
        for k, down in kfile.items():
            if k.endswith(".lora_down.weight"):
                base = k[: -len(".lora_down.weight")]
                up, alpha = kfile[base + ".lora_up.weight"], float(kfile[base + ".alpha"])
                table[base].weight += (alpha / down.shape[0]) * (up @ down)
                merged += 1
        o = unet_call(u2, g["sample"], g["timestep"], g["encoder_hidden_states"], g["text_embeds"], g["time_ids"])
        errs[f"kohya merged by hand ({merged} modules, all components): unet"] = rel_err(o, g["unet_out_lora"])
        errs["kohya merged by hand: te1 h[-2]"] = rel_err(t1(g["tok1_ids"], output_hidden_states=True).hidden_states[-2], g["te1.hidden_states_m2"])
        errs["kohya merged by hand: te2 text_embeds"] = rel_err(t2(g["tok2_ids"]).text_embeds, g["te2.text_embeds"])
    for k, v in errs.items():
        print(f"  spec: {k:62s} max rel err {v:.2e}")
        assert v < (1e-4 if "merged" in k else 1e-5), (k, v)  # merged weights round differently from W x + s B A x
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--tokenizer-src", default=DEFAULT_TOKENIZER_SRC)
    ap.add_argument("--verify-only", action="store_true")
    args = ap.parse_args()
    quiet()
    if not args.verify_only:
        build(args.out, args.tokenizer_src)
        make_goldens(args.out)
    verify(args.out)
    spec_check(args.out)
    total = 0
    print("files:")
    for root, dirs, files in sorted(os.walk(args.out)):
        dirs.sort()
        for fn in sorted(files):
            p = os.path.join(root, fn)
            total += os.path.getsize(p)
            print(f"  {os.path.relpath(p, args.out):70s} {os.path.getsize(p):>9d}")
    print(f"total {total} bytes ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
