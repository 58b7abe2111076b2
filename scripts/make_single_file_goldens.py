"""Goldens for single-file (original CompVis / A1111 layout) checkpoints.

Writes, from diffusers folders, the one-file layout that SD-1.x and SD-2.x checkpoints use, with
a mapping written here independently of knobs, and proves each file right by loading it back with
diffusers' own `from_single_file` (given the folder as `config`) and comparing every tensor of
every component with the folder's. What knobs must reproduce is then saved as JSON:

- `sd1`: the tiny SD-1.x pipeline of ../shared/golden/tiny-sd: every key of the file with its
  shape and two checksums of its values (sum, and sum weighted by (index % 7 + 1)).
- `sd2`: a tiny SD-2.x-style pipeline (OpenCLIP text encoder, linear projections, 64-channel
  heads) made here with random weights: its diffusers configs and every key of the file with
  its shape (knobs builds the same architecture from the configs and must write the same keys).

    python scripts/make_single_file_goldens.py ../shared/golden/tiny-sd \
        crates/knobs-diffusion/tests/fixtures/single_file_layout.json

Needs torch, diffusers, transformers, safetensors (see ../shared/reference/README.md).
"""
import json, os, re, shutil, sys, tempfile

import torch
from safetensors.torch import load_file, save_file


def unet_to_ldm(key, layers, attn_blocks_up):
    """diffusers UNet2DConditionModel key -> `model.diffusion_model.` key."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]

    def res(rest):
        for a, b in resnet:
            if rest.startswith(a + "."):
                return b + rest[len(a):]
        raise KeyError(rest)

    name, _, leaf = key.rpartition(".")
    if name in fixed:
        return f"{fixed[name]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{b * (layers + 1) + j + 1}.0.{res(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{b * (layers + 1) + j + 1}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{res(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * (layers + 1) + j}.0.{res(rest)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * (layers + 1) + j}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        slot = 2 if b in attn_blocks_up else 1
        return f"output_blocks.{b * (layers + 1) + layers}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def vae_to_ldm(key, levels):
    """diffusers AutoencoderKL key -> `first_stage_model.` key (and whether it becomes a 1x1 conv)."""
    def res(rest):
        return rest.replace("conv_shortcut", "nin_shortcut")

    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for part in ("encoder", "decoder"):
        if m := re.match(part + r"\.mid_block\.resnets\.(\d+)\.(.*)", key):
            return f"{part}.mid.block_{int(m[1]) + 1}.{res(m[2])}", False
        if m := re.match(part + r"\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            return f"{part}.mid.attn_1.{attn[m[1]]}.{m[2]}", m[1] != "group_norm"
        if key.startswith(part + ".conv_norm_out."):
            return key.replace("conv_norm_out", "norm_out"), False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{res(m[3])}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{res(m[3])}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    return key, False


def open_clip_entries(sd, hidden):
    """HF CLIPTextModel tensors -> OpenCLIP `cond_stage_model.model.` tensors (q/k/v fused)."""
    out = {}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
    for i in layers:
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[q + f"attn.in_proj_{leaf}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            out[q + f"attn.out_proj.{leaf}"] = sd[p + f"self_attn.out_proj.{leaf}"]
            out[q + f"ln_1.{leaf}"] = sd[p + f"layer_norm1.{leaf}"]
            out[q + f"ln_2.{leaf}"] = sd[p + f"layer_norm2.{leaf}"]
            out[q + f"mlp.c_fc.{leaf}"] = sd[p + f"mlp.fc1.{leaf}"]
            out[q + f"mlp.c_proj.{leaf}"] = sd[p + f"mlp.fc2.{leaf}"]
    # Real SD-2 files carry OpenCLIP's projection; diffusers (and knobs) ignore it.
    out["text_projection"] = torch.randn(hidden, hidden)
    return out


def to_single_file(folder, open_clip):
    unet_cfg = json.load(open(os.path.join(folder, "unet/config.json")))
    vae_cfg = json.load(open(os.path.join(folder, "vae/config.json")))
    layers = unet_cfg["layers_per_block"]
    attn_up = {i for i, t in enumerate(unet_cfg["up_block_types"]) if t.startswith("CrossAttn")}
    out = {}
    for k, v in load_file(os.path.join(folder, "unet/diffusion_pytorch_model.safetensors")).items():
        out["model.diffusion_model." + unet_to_ldm(k, layers, attn_up)] = v
    for k, v in load_file(os.path.join(folder, "vae/diffusion_pytorch_model.safetensors")).items():
        name, conv = vae_to_ldm(k, len(vae_cfg["block_out_channels"]))
        out["first_stage_model." + name] = v[:, :, None, None] if conv and v.ndim == 2 else v
    te = {k.removeprefix("text_model."): v for k, v in load_file(os.path.join(folder, "text_encoder/model.safetensors")).items()}
    te.pop("embeddings.position_ids", None)
    if open_clip:
        hidden = te["embeddings.token_embedding.weight"].shape[1]
        out.update({"cond_stage_model.model." + k: v for k, v in open_clip_entries(te, hidden).items()})
    else:
        out.update({"cond_stage_model.transformer.text_model." + k: v for k, v in te.items()})
    return {k: v.contiguous() for k, v in out.items()}


def check_with_diffusers(file, folder):
    """diffusers' own single-file loader must give back the folder's tensors, bit for bit."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(file, config=folder, local_files_only=True, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        want = load_file(os.path.join(folder, name, "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"))
        got = getattr(pipe, name).state_dict()
        want = {k.removeprefix("text_model."): v for k, v in want.items() if not k.endswith("position_ids")}
        got = {k.removeprefix("text_model."): v for k, v in got.items() if not k.endswith("position_ids")}
        assert set(want) == set(got), (name, sorted(set(want) ^ set(got))[:5])
        for k in want:
            assert torch.equal(want[k], got[k]), (name, k)
    print(f"{file}: diffusers from_single_file gives the folder back exactly")


def tiny_sd2(folder, tokenizer_from):
    """A tiny SD-2.x-style pipeline: OpenCLIP-style (gelu) text encoder, linear projections,
    64-channel heads, v-prediction."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=64, attention_head_dim=(1, 1), use_linear_projection=True,
                                upcast_attention=True)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, sample_size=64)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu",
                                      bos_token_id=998, eos_token_id=999, pad_token_id=1, projection_dim=64))
    tok = CLIPTokenizer.from_pretrained(tokenizer_from, pad_token="!")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)


def checksums(t):
    x = t.double().flatten()
    w = torch.arange(x.numel(), dtype=torch.float64) % 7 + 1
    return [x.sum().item(), (x * w).sum().item()]


def main():
    tiny_sd, out = sys.argv[1], sys.argv[2]
    work = tempfile.mkdtemp()
    sd1 = to_single_file(tiny_sd, open_clip=False)
    save_file(sd1, os.path.join(work, "sd1.safetensors"))
    check_with_diffusers(os.path.join(work, "sd1.safetensors"), tiny_sd)

    sd2_dir = os.path.join(work, "tiny-sd2")
    tiny_sd2(sd2_dir, os.path.join(tiny_sd, "tokenizer"))
    sd2 = to_single_file(sd2_dir, open_clip=True)
    save_file(sd2, os.path.join(work, "sd2.safetensors"))
    check_with_diffusers(os.path.join(work, "sd2.safetensors"), sd2_dir)
    configs = {name: json.load(open(os.path.join(sd2_dir, name, "config.json"))) for name in ("unet", "vae", "text_encoder")}

    golden = {
        "sd1": {k: {"shape": list(v.shape), "checksums": checksums(v)} for k, v in sorted(sd1.items())},
        "sd2": {"configs": configs, "keys": {k: list(v.shape) for k, v in sorted(sd2.items())}},
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(golden, f, indent=0, sort_keys=True)
    shutil.rmtree(work)
    print(f"wrote {out}: {len(golden['sd1'])} SD-1 keys, {len(golden['sd2']['keys'])} SD-2 keys")


if __name__ == "__main__":
    main()
