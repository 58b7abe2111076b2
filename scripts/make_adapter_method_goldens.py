#!/usr/bin/env python3
"""Goldens for the LoHa, LoKr, DoRA and OFT adapter methods on the tiny SD-1.x UNet.

Writes crates/knobs-diffusion/tests/fixtures/adapter_methods/:

- `unet_methods.safetensors`: the UNet inputs of ../shared/golden/tensors/unet_ia3.safetensors
  (`sample`, `timestep`, `encoder_hidden_states`), `out_base`, and for every case
  `out_<case>` (adapter active, unmerged), `out_<case>_merged` (PEFT merge_and_unload),
  `out_<case>_lycoris` (LyCORIS applied, its default non-bypass forward) and, where LyCORIS's
  own merge agrees with its forward, `out_<case>_lycoris_merged`.
- `<case>_peft/`: adapter_config.json + adapter_model.safetensors from PeftModel.save_pretrained
  of `get_peft_model(unet, config)` (keys `base_model.model.<module path>.<param>`), the layout
  of ../shared/golden/tensors/lora_peft and ia3_peft.
- `<case>_lycoris.safetensors`: kohya-style single files (`lora_unet_<path with _>.<param>`)
  written by LyCORIS's own LycorisNetworkKohya.save_weights.
- `README.md`: the spec (configs, key names and shapes, formulas, measured changes).

Every adapter parameter is overwritten with seeded random values after creation (PEFT and
LyCORIS initialise to identity). Every file is reloaded with PEFT / LyCORIS and must reproduce
its output; every case is also recomputed from the saved tensors with the formulas written in
the README (a fresh UNet whose weights are merged by those formulas) and must match.

    /tmp/ref-venv/bin/python scripts/make_adapter_method_goldens.py

Needs torch, diffusers, peft 0.21.2, lycoris-lora 4.1.3 (+ einops, toml); runs offline on CPU.
"""
import os
import sys

if os.environ.get("PYTHONHASHSEED") != "0":  # set-ordered config lists (target_modules) -> stable bytes
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import copy
import json
import logging
import shutil
import tempfile
import warnings

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "knobs-diffusion", "tests", "fixtures", "adapter_methods")
SHARED = os.path.join(os.path.dirname(REPO), "shared", "golden")
if not os.path.isdir(SHARED):
    SHARED = "/work/shared/golden"
DEFAULT_UNET = os.path.join(SHARED, "tiny-sd", "unet")
DEFAULT_INPUTS = os.path.join(SHARED, "tensors", "unet_ia3.safetensors")

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]  # Linear, in every attn1/attn2
CONV3 = ["conv1"]  # resnets.N.conv1: Conv2d 3x3, padding 1
CONV1 = ["proj_in"]  # attentions.N.proj_in: Conv2d 1x1 (use_linear_projection=False)
TARGETS = ATTN + CONV3 + CONV1
# the same modules for LyCORIS (preset `unet_target_name`, re.match on the module path)
LYCORIS_NAMES = {
    "attn": r".*\.(to_q|to_k|to_v|to_out\.0)$",
    "conv3": r".*resnets\.\d+\.conv1$",
    "conv1": r".*\.proj_in$",
}
TOL = 1e-4  # max|a-b| / max|b|
LYCORIS_DTYPE = torch.float16  # kohya / LyCORIS files are usually saved in fp16

# ------------------------------------------------------------------------------------------ cases
# sigma: std of the N(0, sigma^2) values written into every adapter parameter of that kind
# (magnitude / dora_scale: multiplied by 1 + N(0, sigma^2) instead).
PEFT_CASES = {
    "loha": dict(kind="LOHA", cfg=dict(r=4, alpha=8, target_modules=TARGETS), seed=1001,
                 sigma={"hada_": 0.13}),
    "loha_cp": dict(kind="LOHA", cfg=dict(r=4, alpha=8, use_effective_conv2d=True, target_modules=TARGETS),
                    seed=1002, sigma={"hada_w": 0.165, "hada_t": 0.275}),
    "lokr": dict(kind="LOKR", cfg=dict(r=4, alpha=8, decompose_factor=-1, decompose_both=False,
                                       target_modules=TARGETS), seed=1003, sigma={"lokr_": 0.04}),
    # effective (CP) conv form with a full w1: only conv1 targeted (the Linear layers are as in `lokr`)
    "lokr_cp": dict(kind="LOKR", cfg=dict(r=4, alpha=8, use_effective_conv2d=True, target_modules=CONV3), seed=1010,
                    sigma={"lokr_w": 0.04, "lokr_t2": 0.3}),
    "lokr_both": dict(kind="LOKR", cfg=dict(r=2, alpha=4, decompose_both=True, decompose_factor=8,
                                            use_effective_conv2d=True, target_modules=TARGETS),
                      seed=1004, sigma={"lokr_w1": 0.11, "lokr_w2": 0.19, "lokr_t2": 0.3}),
    "dora": dict(kind="DORA", cfg=dict(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS), seed=1005,
                 sigma={"lora_A": 0.025, "lora_B": 0.025, "lora_magnitude_vector": 0.05}),
    "oft": dict(kind="OFT", cfg=dict(target_modules=ATTN + CONV1), seed=1006, sigma={"oft_R": 0.015}),
    "oft_coft": dict(kind="OFT", cfg=dict(coft=True, eps=0.3, target_modules=ATTN + CONV1), seed=1007,
                     sigma={"oft_R": 0.05}),
    "oft_cayley": dict(kind="OFT", cfg=dict(oft_block_size=8, use_cayley_neumann=False, target_modules=ATTN + CONV1),
                       seed=1008, sigma={"oft_R": 0.04}),
    # PEFT regex (re.fullmatch): the 3x3 conv1 of down_blocks.* and mid_block only (size)
    "oft_conv3x3": dict(kind="OFT", cfg=dict(target_modules=r".*(down_blocks\.\d+|mid_block)\.resnets\.\d+\.conv1"),
                        seed=1009, sigma={"oft_R": 0.01}),
}

# LyCORIS, through lycoris.kohya.create_network(multiplier=1, network_dim, network_alpha, ...)
LYCORIS_CASES = {
    "loha": dict(algo="loha", dim=4, alpha=8, kw={}, seed=2001, sigma={"hada_": 0.13}),
    "loha_cp": dict(algo="loha", dim=4, alpha=8, kw={"use_tucker": True}, seed=2002,
                    sigma={"hada_w": 0.17, "hada_t": 0.3}, store=False),  # same keys/math as PEFT loha_cp
    "lokr": dict(algo="lokr", dim=4, alpha=8, kw={"factor": -1}, seed=2003, sigma={"lokr_": 0.05}),
    "lokr_both": dict(algo="lokr", dim=1, alpha=2, kw={"decompose_both": True, "factor": 4, "use_tucker": True},
                      seed=2004, sigma={"lokr_w1": 0.2, "lokr_w2": 0.27, "lokr_t2": 0.4}),
    "dora": dict(algo="locon", dim=4, alpha=8, kw={"dora_wd": True, "wd_on_output": True}, seed=2005,
                 sigma={"lora_down": 0.03, "lora_up": 0.03, "dora_scale": 0.05}),
    "oft": dict(algo="diag-oft", dim=8, alpha=0, kw={"constraint": 0}, seed=2006, sigma={"oft_blocks": 0.015}),
    "oft_constrained": dict(algo="diag-oft", dim=8, alpha=0, kw={"constraint": 2 ** -8}, seed=2007,
                            sigma={"oft_blocks": 0.05}),
}


# ------------------------------------------------------------------------------------------ helpers
def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def sigma_for(name, table):
    for k, v in table.items():
        if k in name:
            return v
    raise KeyError(f"no sigma for {name}")


@torch.no_grad()
def randomize(named_params, seed, table, multiplicative=("lora_magnitude_vector", "dora_scale")):
    """Overwrite every adapter parameter (sorted by name) with seeded random values."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in sorted(named_params, key=lambda kv: kv[0]):
        s = sigma_for(name, table)
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if any(m in name for m in multiplicative):
            p.mul_(1.0 + s * noise)
        else:
            p.copy_(noise * s)
        n += 1
    assert n > 0
    return n


def load_unet(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, local_files_only=True).eval()


@torch.no_grad()
def run(model, inp):
    return model(inp["sample"], inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"]).sample


def st_shapes(path):
    with safe_open(path, "pt") as f:
        return ({k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()},
                (f.metadata() or {}))


def quiet_lycoris():
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    try:
        from lycoris.logging import logger

        logger.setLevel(logging.ERROR)
    except Exception:
        pass


# ------------------------------------------------------------------------------------------ formulas
# Independent re-implementation of every method from the *saved* tensors, as written in the
# README. Each returns the merged weight W' of one module.
def skew_from_vec(vec, b):
    rows, cols = torch.triu_indices(b, b, 1)
    q = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    q[:, rows, cols] = vec
    return q - q.transpose(1, 2)


def peft_oft_rotation(vec, b, cfg):
    """Block matrices R_i (n_blocks, b, b) exactly as PEFT 0.21 OFTRotationModule.get_weight."""
    q = skew_from_vec(vec, b)
    if cfg.get("coft", False):
        n = q.shape[0]
        eps = cfg.get("eps", 6e-5) / (n ** 0.5)
        norm = q.flatten(1).norm(dim=1).view(-1, 1, 1)
        q = torch.where(norm <= eps, q, q * (eps / norm))
    eye = torch.eye(b).expand_as(q)
    if cfg.get("use_cayley_neumann", True):
        terms = cfg.get("num_cayley_neumann_terms", 5)
        r = eye.clone()
        if terms > 1:  # mirrors PEFT's loop exactly (T=3 and T=4 give the same polynomial)
            r = r + 2 * q
            if terms > 2:
                p = q @ q
                r = r + 2 * p
                for _ in range(3, terms - 1):
                    p = p @ q
                    r = r + 2 * p
                r = r + p @ q
        return r
    return (eye - q) @ torch.linalg.inv(eye + q)


def peft_effective_weight(kind, cfg, t, W):
    if kind == "LOHA":
        s = cfg["alpha"] / cfg["r"]
        if "hada_t1" in t:
            w1 = torch.einsum("abhw,ao,bi->oihw", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = torch.einsum("abhw,ao,bi->oihw", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return W + s * (w1 * w2).reshape(W.shape)
    if kind == "LOKR":
        s = cfg["alpha"] / cfg["r"]
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("abhw,ap,bq->pqhw", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]).contiguous()
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return W + s * torch.kron(w1, w2).reshape(W.shape)
    if kind == "DORA":
        s = cfg["lora_alpha"] / cfg["r"]
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        r = a.shape[0]
        V = W + s * (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(W.shape)
        n = V.reshape(V.shape[0], -1).norm(dim=1)
        m = t["lora_magnitude_vector"].reshape(-1)
        return V * (m / n).view(-1, *[1] * (W.dim() - 1))
    if kind == "OFT":
        vec = t["oft_R.weight"]
        n_el = vec.shape[1]
        b = int(round((1 + (1 + 8 * n_el) ** 0.5) / 2))
        R = peft_oft_rotation(vec, b, cfg)
        W2 = W.reshape(W.shape[0], -1)
        n_blocks = W2.shape[1] // b
        if R.shape[0] == 1 and n_blocks > 1:  # block_share
            R = R.expand(n_blocks, b, b)
        Rfull = torch.block_diag(*R)
        return (W2 @ Rfull.T).reshape(W.shape)
    raise ValueError(kind)


def lycoris_effective_weight(t, W):
    eps32 = torch.finfo(torch.float32).eps
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        s = alpha / r
        if "hada_t1" in t:
            w1 = torch.einsum("abhw,ao,bi->oihw", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = torch.einsum("abhw,ao,bi->oihw", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return W + s * (w1 * w2).reshape(W.shape)
    if "lokr_w1" in t or "lokr_w1_a" in t:
        dim = None
        if "lokr_w1_b" in t:
            dim = t["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in t:
            dim = t["lokr_w2_b"].shape[0]
        s = alpha / dim if (alpha is not None and dim is not None) else 1.0
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("abhw,ap,bq->pqhw", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]).contiguous()
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return W + s * torch.kron(w1, w2).reshape(W.shape)
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        r = down.shape[0]
        s = alpha / r
        V = W + s * (up.reshape(-1, r) @ down.reshape(r, -1)).reshape(W.shape)
        if "dora_scale" not in t:
            return V
        ds = t["dora_scale"]
        if ds.shape[0] == W.shape[0] and ds.numel() == W.shape[0]:  # wd_on_out: per output row
            n = V.reshape(V.shape[0], -1).norm(dim=1).view(-1, *[1] * (W.dim() - 1))
        else:  # wd_on_out=False: per input column
            n = V.transpose(0, 1).reshape(V.shape[1], -1).norm(dim=1).view(1, -1, *[1] * (W.dim() - 2))
        return V * ds / (n + eps32)
    if "oft_blocks" in t:
        B = t["oft_blocks"]
        nb, bs, _ = B.shape
        Q = B - B.transpose(1, 2)
        c = (alpha or 0.0) * W.shape[0]
        if c > 0:
            qn = Q.norm() + 1e-8
            if qn > c:
                Q = Q * c / qn
        eye = torch.eye(bs)
        R = (eye + Q) @ torch.linalg.inv(eye - Q)
        return torch.einsum("knm,kn...->km...", R, W.reshape(nb, bs, *W.shape[1:])).reshape(W.shape)
    raise ValueError(sorted(t))


def peft_groups(path):
    """adapter_model.safetensors -> {module path: {param: tensor}}."""
    sd = load_file(path)
    out = {}
    params = ("hada_", "lokr_", "lora_A", "lora_B", "lora_magnitude_vector", "oft_R")
    for k, v in sd.items():
        assert k.startswith("base_model.model."), k
        k = k[len("base_model.model."):]
        cut = min(k.find("." + p) for p in params if ("." + p) in k)
        out.setdefault(k[:cut], {})[k[cut + 1:]] = v
    return out


def lycoris_groups(path, unet):
    sd = load_file(path)
    names = {"lora_unet_" + n.replace(".", "_"): n for n, _ in unet.named_modules() if n}
    out = {}
    for k, v in sd.items():
        head, _, param = k.partition(".")
        out.setdefault(names[head], {})[param] = v.float()  # files are fp16: compute in f32
    return out


@torch.no_grad()
def formula_output(unet_path, inp, groups, fn):
    """A fresh UNet whose adapted modules get the README-formula weights."""
    u = load_unet(unet_path)
    mods = dict(u.named_modules())
    for path, t in groups.items():
        m = mods[path]
        m.weight.copy_(fn(t, m.weight.detach().clone()))
    return run(u, inp)


# ------------------------------------------------------------------------------------------ PEFT
def make_peft_config(kind, cfg):
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    return {"LOHA": LoHaConfig, "LOKR": LoKrConfig, "DORA": LoraConfig, "OFT": OFTConfig}[kind](**copy.deepcopy(cfg))


def peft_case(name, spec, args, inp, tensors, report):
    from peft import PeftModel, get_peft_model

    adapter_keys = ("hada_", "lokr_", "lora_A", "lora_B", "lora_magnitude_vector", "oft_R")
    config = make_peft_config(spec["kind"], spec["cfg"])
    pm = get_peft_model(load_unet(args.unet), config)
    pm.eval()
    params = [(n, p) for n, p in pm.named_parameters() if any(k in n for k in adapter_keys)]
    n_params = randomize(params, spec["seed"], spec["sigma"])
    out = run(pm, inp)
    if config.peft_type.value == "OFT" and config.coft:
        # PEFT's coft projects oft_R in place on every forward: project the saved values too
        out2 = run(pm, inp)
        assert rel_err(out2, out) < 1e-6
    d = os.path.join(args.out, f"{name}_peft")
    pm.save_pretrained(d, safe_serialization=True)
    os.remove(os.path.join(d, "README.md"))  # PEFT model card (holds a local path)

    # reload exactly as a user would
    re = PeftModel.from_pretrained(load_unet(args.unet), d).eval()
    out_re = run(re, inp)
    e_reload = rel_err(out_re, out)
    assert e_reload < 1e-6, (name, e_reload)
    merged = PeftModel.from_pretrained(load_unet(args.unet), d).eval().merge_and_unload()
    out_m = run(merged, inp)

    saved_cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    groups = peft_groups(os.path.join(d, "adapter_model.safetensors"))
    fcfg = {k: saved_cfg[k] for k in ("r", "alpha", "lora_alpha", "coft", "eps", "use_cayley_neumann",
                                      "num_cayley_neumann_terms", "block_share") if k in saved_cfg}
    out_f = formula_output(args.unet, inp, groups, lambda t, W: peft_effective_weight(spec["kind"], fcfg, t, W))

    tensors[f"out_{name}"] = out
    tensors[f"out_{name}_merged"] = out_m
    base = tensors["out_base"]
    e_merge = rel_err(out_m, out)
    reference = "out_" + name + ("_merged" if e_merge > TOL else "")
    e_formula = rel_err(out_f, tensors[reference])
    report["peft"][name] = {
        "config": {k: v for k, v in saved_cfg.items() if k in spec["cfg"] or k in (
            "r", "alpha", "lora_alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both",
            "decompose_factor", "rank_dropout_scale", "init_weights", "oft_block_size", "coft", "eps", "block_share",
            "use_cayley_neumann", "num_cayley_neumann_terms", "bias", "use_dora", "use_rslora", "fan_in_fan_out",
            "lora_dropout", "peft_type")},
        "seed": spec["seed"], "sigma": spec["sigma"], "adapter_params": n_params,
        "rel_change": rel_err(out, base), "rel_change_merged": rel_err(out_m, base),
        "merged_vs_unmerged": e_merge, "reload_err": e_reload,
        "formula_ref": reference, "formula_err": e_formula,
        "n_modules": len(groups),
    }
    print(f"[peft] {name:12s} change {report['peft'][name]['rel_change']:.4f} merged-vs-unmerged {e_merge:.2e} "
          f"formula-vs-{reference} {e_formula:.2e} ({len(groups)} modules, {n_params} tensors)")
    assert e_formula < TOL, (name, e_formula)


# ------------------------------------------------------------------------------------------ LyCORIS
def lycoris_case(name, spec, args, inp, tensors, report, tmp):
    import toml
    from lycoris.kohya import LycorisNetworkKohya, create_network, create_network_from_weights

    preset = os.path.join(tmp, "preset.toml")
    with open(preset, "w") as f:
        toml.dump({"enable_conv": True, "unet_target_module": [], "unet_target_name": list(LYCORIS_NAMES.values()),
                   "text_encoder_target_module": [], "text_encoder_target_name": []}, f)
    u = load_unet(args.unet)
    kw = dict(spec["kw"])
    net = create_network(1.0, spec["dim"], spec["alpha"], None, None, u, conv_dim=spec["dim"],
                         conv_alpha=spec["alpha"], algo=spec["algo"], preset=preset, **kw)
    net.apply_to(None, u, apply_text_encoder=False, apply_unet=True)
    net.eval()
    n_params = randomize(list(net.named_parameters()), spec["seed"], spec["sigma"])
    with torch.no_grad():  # the file is fp16 (kohya's usual save precision): use fp16-exact values
        for _, t in list(net.named_parameters()) + list(net.named_buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    out = run(u, inp)
    store = spec.get("store", True)
    path = os.path.join(args.out if store else tmp, f"{name}_lycoris.safetensors")
    # metadata=None: LyCORIS then writes only `sshs_model_hash` (safetensors orders several metadata
    # keys randomly, so kohya's ss_* keys would make the file bytes differ run to run)
    net.save_weights(path, LYCORIS_DTYPE, None)

    # reload with LyCORIS's own loader (empty default targets: see check_adapter_files_in_peft.py)
    LycorisNetworkKohya.apply_preset({"unet_target_module": [], "unet_target_name": [],
                                      "text_encoder_target_module": [], "text_encoder_target_name": []})
    u2 = load_unet(args.unet)
    net2, _ = create_network_from_weights(1.0, path, None, None, u2, for_inference=True)
    net2.apply_to(None, u2, apply_text_encoder=False, apply_unet=True)
    out_re = run(u2, inp)
    e_reload = rel_err(out_re, out)
    assert e_reload < 1e-6, (name, e_reload)
    # LyCORIS's merge (kohya network merge_to)
    u3 = load_unet(args.unet)
    net3, wsd = create_network_from_weights(1.0, path, None, None, u3, for_inference=True)
    net3.merge_to(None, u3, wsd, torch.float32, "cpu")
    out_m = run(u3, inp)
    e_merge = rel_err(out_m, out)

    groups = lycoris_groups(path, u)
    out_f = formula_output(args.unet, inp, groups, lambda t, W: lycoris_effective_weight(t, W))
    e_formula = rel_err(out_f, out)

    key = f"out_{name}_lycoris"
    if store:
        tensors[key] = out
        if e_merge <= TOL:
            tensors[key + "_merged"] = out_m
    base = tensors["out_base"]
    report["lycoris"][name] = {
        "algo": spec["algo"], "network_dim": spec["dim"], "network_alpha": spec["alpha"],
        "conv_dim": spec["dim"], "conv_alpha": spec["alpha"], "kwargs": kw,
        "seed": spec["seed"], "sigma": spec["sigma"], "adapter_params": n_params,
        "rel_change": rel_err(out, base), "lycoris_merge_vs_forward": e_merge,
        "merged_stored": store and e_merge <= TOL, "stored": store, "rel_change_lycoris_merge": rel_err(out_m, base),
        "reload_err": e_reload, "formula_err": e_formula, "n_modules": len(groups),
    }
    print(f"[lyco] {name:16s} change {report['lycoris'][name]['rel_change']:.4f} lycoris-merge-vs-forward "
          f"{e_merge:.2e} formula {e_formula:.2e} ({len(groups)} modules, {n_params} tensors)")
    assert e_formula < TOL, (name, e_formula)


# ------------------------------------------------------------------------------------------ README
def key_examples(path, lycoris):
    shapes, meta = st_shapes(path)
    if lycoris:
        lin = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k."
        convs = ["lora_unet_up_blocks_0_resnets_0_conv1.", "lora_unet_down_blocks_0_resnets_0_conv1.",
                 "lora_unet_down_blocks_0_attentions_0_proj_in."]
    else:
        lin = "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_k."
        convs = ["base_model.model.up_blocks.0.resnets.0.conv1.", "base_model.model.down_blocks.0.resnets.0.conv1.",
                 "base_model.model.down_blocks.0.attentions.0.proj_in."]
    rows = []
    for pre in [lin] + convs:
        ks = sorted(k for k in shapes if k.startswith(pre))
        if ks:
            rows.append(f"`{pre}` + " + ", ".join(
                f"`{k[len(pre):]}` {shapes[k][0]} {shapes[k][1]}" for k in ks))
    return rows, len(shapes), meta


def write_readme(args, report, sizes):
    r = report
    L = []
    A = L.append
    A(TEMPLATE_HEAD.strip("\n"))
    A("")
    A("## Cases and measured changes\n")
    A("`change` = max|out_case − out_base| / max|out_base|. `merge≠fwd` = max|out_case_merged − out_case| / "
      "max|out_case|. `formula` = the same for a fresh UNet whose weights were merged with the formulas below "
      "from the saved tensors, against `formula ref`. Every reload with PEFT / LyCORIS reproduced the output "
      "to < 1e-6.\n")
    A("| PEFT case | folder | modules | change | change merged | merge≠fwd | formula ref | formula |")
    A("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, c in r["peft"].items():
        A(f"| `{n}` | `{n}_peft/` | {c['n_modules']} | {c['rel_change']:.4f} | {c['rel_change_merged']:.4f} | "
          f"{c['merged_vs_unmerged']:.1e} | `{c['formula_ref']}` | {c['formula_err']:.1e} |")
    A("")
    A("`oft_conv3x3`: `change` is PEFT's broken unmerged conv forward (see the OFT conv quirk); the real OFT "
      "change is `change merged`.\n")
    A("| LyCORIS case | file | modules | change | LyCORIS merge≠fwd | `_merged` stored | formula |")
    A("| --- | --- | --- | --- | --- | --- | --- |")
    for n, c in r["lycoris"].items():
        fn = f"`{n}_lycoris.safetensors`" if c["stored"] else "not stored (verified only)"
        A(f"| `{n}_lycoris` | {fn} | {c['n_modules']} | {c['rel_change']:.4f} | "
          f"{c['lycoris_merge_vs_forward']:.1e} | {'yes' if c['merged_stored'] else 'no'} | {c['formula_err']:.1e} |")
    A("")
    A("### Exact configs\n")
    A("PEFT (the saved `adapter_config.json` holds every field; these are the method fields):\n")
    for n, c in r["peft"].items():
        A(f"* `{n}`: `{json.dumps(c['config'], sort_keys=True)}`; seed {c['seed']}, sigma "
          f"`{json.dumps(c['sigma'])}`, {c['adapter_params']} adapter tensors")
    A("")
    A("`lokr_both` uses r = 2, alpha = 4 and decompose_factor = 8 (rather than 4) so that this small UNet "
      "holds every LoKr layout at once: decomposed w1 everywhere (PEFT does not swap an explicit factor, so "
      "w1 is [8, ·]), full w2 (32-in Linear, 32→32 convs, 1x1 proj_in), low-rank w2 (64-out Linear) and CP "
      "`lokr_t2` (3x3 convs with 64+ channels); with r = 4 and factor 4 no w1 would be decomposed here. "
      "`lokr_cp` adds full w1 + CP w2. DoRA magnitudes and all other adapter tensors are random (see "
      "Randomisation).\n")
    A("LyCORIS (`lycoris.kohya.create_network(1.0, network_dim, network_alpha, None, None, unet, "
      "conv_dim=network_dim, conv_alpha=network_alpha, algo=..., preset=<toml>, **kwargs)`; for `diag-oft` "
      "network_alpha is ignored and the `constraint` kwarg becomes the stored `alpha`; `wd_on_output` is the "
      "kohya kwarg for LyCORIS's `wd_on_out`):\n")
    for n, c in r["lycoris"].items():
        A(f"* `{n}_lycoris`: algo `{c['algo']}`, network_dim {c['network_dim']}, network_alpha "
          f"{c['network_alpha']}, kwargs `{json.dumps(c['kwargs'], sort_keys=True)}`; seed {c['seed']}, sigma "
          f"`{json.dumps(c['sigma'])}`, {c['adapter_params']} adapter tensors")
    A("")
    A("## Key names and shapes (one Linear, then the Conv2d kinds: 3x3 128→64, 3x3 32→32, 1x1 32→32)\n")
    A("Linear example: `mid_block.attentions.0.transformer_blocks.0.attn2.to_k` (in 32 → out 64). "
      "Conv examples: `up_blocks.0.resnets.0.conv1` (3x3, 128→64), `down_blocks.0.resnets.0.conv1` "
      "(3x3, 32→32), `down_blocks.0.attentions.0.proj_in` (1x1, 32→32). A line is missing where the "
      "case does not target that kind.\n")
    for n in r["peft"]:
        rows, nk, meta = key_examples(os.path.join(args.out, f"{n}_peft", "adapter_model.safetensors"), False)
        A(f"**`{n}_peft/adapter_model.safetensors`** ({nk} tensors, metadata `{json.dumps(meta)}`):\n")
        for row in rows:
            A(f"* {row}")
        A("")
    for n in [n for n, c in r["lycoris"].items() if c["stored"]]:
        rows, nk, meta = key_examples(os.path.join(args.out, f"{n}_lycoris.safetensors"), True)
        mk = sorted(meta)
        A(f"**`{n}_lycoris.safetensors`** ({nk} tensors, metadata keys `{mk}`):\n")
        for row in rows:
            A(f"* {row}")
        A("")
    A(TEMPLATE_FORMULAS.strip("\n"))
    A("")
    A("## Files\n")
    A("| file | bytes |")
    A("| --- | --- |")
    for rel, sz in sizes:
        A(f"| `{rel}` | {sz} |")
    A("")
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("\n".join(L))


TEMPLATE_HEAD = r"""
# Adapter-method goldens: LoHa, LoKr, DoRA, OFT (PEFT 0.21.2 and LyCORIS 4.1.3)

Made by `scripts/make_adapter_method_goldens.py` from the tiny SD-1.x UNet of
`shared/golden/tiny-sd/unet` (diffusers layout; 8 heads, channels 32/64, cross-attention dim 32),
fp32 on CPU, torch 2.15, diffusers 0.42.1, peft 0.21.2, lycoris-lora 4.1.3. Regenerate with

    /tmp/ref-venv/bin/python scripts/make_adapter_method_goldens.py \
        [--unet ../shared/golden/tiny-sd/unet] [--inputs ../shared/golden/tensors/unet_ia3.safetensors]

(it re-executes itself with PYTHONHASHSEED=0 so that `target_modules` in adapter_config.json is
byte-stable), and check any adapter file against the goldens with

    /tmp/ref-venv/bin/python scripts/check_adapter_files_in_peft.py \
        --unet ../shared/golden/tiny-sd/unet \
        --inputs crates/knobs-diffusion/tests/fixtures/adapter_methods/unet_methods.safetensors \
        --peft crates/knobs-diffusion/tests/fixtures/adapter_methods/loha_peft \
        --lycoris crates/knobs-diffusion/tests/fixtures/adapter_methods/loha_lycoris.safetensors \
        --expect crates/knobs-diffusion/tests/fixtures/adapter_methods/unet_methods.safetensors

Naming rule of the checker: a PEFT folder `X_peft` (or `X`) is compared with `out_X`, a LyCORIS
file `Y.safetensors` with `out_Y` (`loha_lycoris.safetensors` → `out_loha_lycoris`); `PATH=NAME`
compares with `out_NAME` instead. It exits 1 when any max|out − expected| / max|expected| > 1e-4.

## unet_methods.safetensors

* inputs, copied from `shared/golden/tensors/unet_ia3.safetensors`: `sample` [2,4,32,32] f32,
  `timestep` [2] i64 = [999, 37], `encoder_hidden_states` [2,77,32] f32.
* `out_base` = `unet(sample, timestep, encoder_hidden_states).sample` without adapters (equal to
  that file's `out_base`).
* `out_<case>`: PEFT model (`get_peft_model(unet, config)`, eval mode), adapter active, unmerged.
* `out_<case>_merged`: the same folder loaded with `PeftModel.from_pretrained` then
  `merge_and_unload()`.
* `out_<case>_lycoris`: LyCORIS network applied to the UNet (`apply_to`, default non-bypass
  "rebuild" forward: y = base(x) + op(x, W' − W)), multiplier 1.
* `out_<case>_lycoris_merged`: after LyCORIS's own `merge_to`, stored only where it agrees with
  `out_<case>_lycoris` (see "LyCORIS merge quirk").
* metadata key `golden`: JSON with every config, seed, sigma and the measured numbers below.

## Targets

All cases target the same module kinds unless noted: the attention projections `to_q`, `to_k`,
`to_v`, `to_out.0` (Linear, 48 modules; `to_out.0` has a bias, the others not), the resnets'
`conv1` (Conv2d 3x3, stride 1, padding 1, with bias; 12 modules, in/out 32→32, 32→64, 64→64,
128→64, 96→64, 96→32, 64→32) and the transformers' `proj_in` (Conv2d 1x1 with bias, 32→32 or
64→64; 6 modules: this UNet has use_linear_projection=False). 66 modules in all.
PEFT: `target_modules=["to_q","to_k","to_v","to_out.0","conv1","proj_in"]` (suffix match).
LyCORIS: a preset with `unet_target_module=[]` and `unet_target_name` = the regexes
`.*\.(to_q|to_k|to_v|to_out\.0)$`, `.*resnets\.\d+\.conv1$`, `.*\.proj_in$` (`re.match` on the
diffusers module path); conv_dim = network_dim and conv_alpha = network_alpha, so 3x3 and 1x1
convs get the same rank/alpha as Linear layers.
PEFT `lokr_cp` targets only the 12 `conv1`. The PEFT OFT cases `oft`, `oft_coft`, `oft_cayley`
target attention + `proj_in` only, and
`oft_conv3x3` targets only the `conv1` of `down_blocks.*` and `mid_block` (6 modules, in 32 or 64;
regex `.*(down_blocks\.\d+|mid_block)\.resnets\.\d+\.conv1`, kept small: its blocks are
dense) — see the OFT conv quirk.

## Randomisation

PEFT and LyCORIS initialise every method to the identity (a zero factor / zero skew). After
creation every adapter parameter, in name order, is overwritten with `N(0, sigma²)` values from
`torch.Generator().manual_seed(seed)` (sigma per parameter kind, listed per case below); the DoRA
magnitudes (`lora_magnitude_vector`, LyCORIS `dora_scale`) are instead multiplied by
`1 + N(0, sigma²)`, i.e. perturbed around PEFT's/LyCORIS's initial value ‖W‖ (the row norm of the
base weight), so they are NOT equal to the norm of the adapted weight. LyCORIS `alpha` buffers
keep the configured value.

## File layouts

**PEFT folders** (`<case>_peft/`): exactly what `PeftModel.save_pretrained(dir,
safe_serialization=True)` writes for `get_peft_model(unet, config)` (the model card README.md is
removed, as in shared/golden/tensors/lora_peft): `adapter_config.json` (all config fields,
`peft_type` LOHA / LOKR / LORA (+`use_dora: true`) / OFT, `peft_version` 0.21.2) and
`adapter_model.safetensors` with metadata `{"format": "pt"}` and keys
`base_model.model.<diffusers module path>.<param>`; the adapter name (`default`) is stripped, so a
key is e.g. `base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_a`
(same prefix as lora_peft / ia3_peft). Param names: LoHa `hada_w1_a, hada_w1_b, hada_w2_a,
hada_w2_b[, hada_t1, hada_t2]`; LoKr `lokr_w1 | lokr_w1_a+lokr_w1_b`, `lokr_w2 |
lokr_w2_a+lokr_w2_b[+lokr_t2]`; DoRA `lora_A.weight, lora_B.weight, lora_magnitude_vector` (no
`.weight` suffix on the magnitude); OFT `oft_R.weight`. r and alpha are NOT in the tensors (PEFT
LoHa/LoKr/LoRA have no alpha tensor): read `r`, `alpha` / `lora_alpha` (and `rank_pattern`,
`alpha_pattern`, both empty here) from adapter_config.json.

**LyCORIS / kohya files** (`<case>_lycoris.safetensors`): written by LyCORIS's
`LycorisNetworkKohya.save_weights(file, torch.float16, metadata)` (network from
`lycoris.kohya.create_network`). **Every tensor in these files is F16** (kohya's usual
`--save_precision fp16`; PEFT folders are F32): the random values were rounded to fp16 before the
goldens were computed, so upcasting the file to f32 reproduces `out_<case>_lycoris` exactly
(LyCORIS itself copies them into f32 modules and computes in f32). Keys are `lora_unet_<diffusers module path with "." → "_">.<param>`,
e.g. `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.hada_w1_a` —
LyCORIS's kohya wrapper uses the `lora_unet` prefix itself, and for SD-1.x this diffusers-path
naming is the kohya (sd-scripts) naming that A1111 and ComfyUI load (their SD-1.x LoRA key maps
are built from the diffusers module names). Every module has a scalar `alpha` (shape [], F16 like
the rest of the file).
Metadata: only `sshs_model_hash` (added by LyCORIS's save; the kohya trainer would add `ss_*`
keys, left out here because safetensors writes several metadata keys in random order, which would
make the bytes differ run to run). Metadata is informative only: loaders detect the method from
the key names: `hada_w1_a` → LoHa, `lokr_w1`/`lokr_w1_a` → LoKr, `lora_up.weight` (+
`dora_scale`) → LoCon/DoRA, `oft_blocks` [n,b,b] → diag-OFT.
"""

TEMPLATE_FORMULAS = r"""
## Formulas (what PEFT 0.21.2 / LyCORIS 4.1.3 compute)

Notation: W is the base weight, [out, in] (Linear) or [out, in, kh, kw] (Conv2d); `flat(W)` is
W viewed as [out, in·kh·kw] (row-major, so column index = c·kh·kw + y·kw + x). ΔW is added to W
and the layer then runs unchanged (same stride/padding/dilation/groups; **the bias is never
changed**). s is the scale. "Unmerged" forward = base(x) + op(x, ΔW) (LoHa/LoKr); merged = the
same with W + ΔW; the tables above show they agree to float rounding except where stated.

### LoHa (PEFT `LOHA`, LyCORIS `loha`)

* Linear, and Conv2d without the CP option (and every 1x1 conv, even with it): `hada_w1_a`
  [out, r], `hada_w1_b` [r, in·kh·kw], `hada_w2_a` [out, r], `hada_w2_b` [r, in·kh·kw];
  ΔW = s · ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)), reshaped to W's shape.
* Conv2d kxk (k>1) with PEFT `use_effective_conv2d=True` / LyCORIS `use_tucker=True` (the
  FedPara CP/Tucker form): `hada_t1`, `hada_t2` [r, r, kh, kw], `hada_w1_a`, `hada_w2_a` [r, out]
  (note: transposed w.r.t. the flat case), `hada_w1_b`, `hada_w2_b` [r, in];
  W_j[o, i, y, x] = Σ_{a,b} t_j[a, b, y, x] · w_j_a[a, o] · w_j_b[b, i] (einsum
  `"abyx,ao,bi->oiyx"`), ΔW = s · W_1 ⊙ W_2. PEFT disables the CP form for 1x1 convs
  (flat form instead), LyCORIS too (`use_tucker and any(k != 1)`).
* PEFT: s = alpha / r from adapter_config.json (here 8/4 = 2). LyCORIS: s = alpha / r with alpha
  the file's `alpha` scalar and r = `hada_w1_b.shape[0]` (PEFT and LyCORIS use the same key names
  and the same shapes, so a LyCORIS module is a PEFT module with its alpha in the file). The
  LyCORIS CP form (`loha_cp_lycoris`, `use_tucker=True`) is built, reloaded and checked against
  this formula by the script, but not stored (it is key-for-key the layout of `loha_cp_peft`).
* rank_dropout / module_dropout only act in training; 0 here.

### LoKr (PEFT `LOKR`, LyCORIS `lokr`)

* Factorisation of a dimension n by `factorization(n, f)`: if f > 0 and f divides n → (f, n/f)
  [LyCORIS then swaps to (min, max); **PEFT does not swap**]; otherwise (f = -1 means f = n) the
  pair (m, n/m) with m ≤ n/m, m the largest divisor of n with m ≤ f whose sum m + n/m keeps
  decreasing (i.e. closest to √n). Examples: 32 → (4, 8), 64 → (8, 8), 96 → (8, 12),
  128 → (8, 16); with f = 8, PEFT: 32 → (8, 4), 96 → (8, 12); LyCORIS: 32 → (4, 8); with f = 4:
  32 → (4, 8), 64 → (4, 16), 96 → (4, 24), 128 → (4, 32).
* out = a·b with (a, b) = factorization(out, f), in = c·d with (c, d) = factorization(in, f).
  w1 is [a, c]: `lokr_w1` [a, c] (full) unless `decompose_both` and r < max(a, c)/2, then
  `lokr_w1_a` [a, r] @ `lokr_w1_b` [r, c]. w2 is [b, d] (Linear) or [b, d, kh, kw] (conv):
  `lokr_w2` full if r ≥ max(b, d)/2 (Linear: PEFT `not (r < max/2)`, conv: `r >= max/2`, same
  thing), else Linear / flat conv: `lokr_w2_a` [b, r] @ `lokr_w2_b` [r, d·kh·kw]; conv kxk with
  PEFT `use_effective_conv2d` / LyCORIS `use_tucker`: `lokr_t2` [r, r, kh, kw], `lokr_w2_a`
  [r, b], `lokr_w2_b` [r, d], w2[p, q, y, x] = Σ_{i,j} t2[i, j, y, x] · w2_a[i, p] · w2_b[j, q]
  (einsum `"ijyx,ip,jq->pqyx"`). PEFT disables the effective form for 1x1 convs.
* ΔW = s · kron(w1, w2): for a 4-D w2, w1 is viewed as [a, c, 1, 1] and
  ΔW[i·b + p, j·d + q, y, x] = w1[i, j] · w2[p, q, y, x]; for a 2-D w2 (Linear, or a conv with
  flat `lokr_w2_b` [r, d·kh·kw]) kron gives [a·b, c·d·kh·kw], reshaped to W's shape (the same
  element placement).
* Scale: **PEFT always s = alpha / r** (from adapter_config.json, even when both w1 and w2 are
  full matrices). **LyCORIS forces alpha := r (s = 1) when both w1 and w2 are full** and stores
  that alpha (= network_dim) in the file; its loaders (and ComfyUI's) take s = alpha / dim with
  dim = `lokr_w1_b.shape[0]` or `lokr_w2_b.shape[0]`, and s = 1 when the module has neither
  (so a full/full module in a LyCORIS file always has s = 1, whatever `alpha` says). In
  `lokr_lycoris` (r 4, alpha 8) the 62 full/full modules store alpha 4 and have s = 1, the 4
  convs with in 96/128 (`up_blocks.0.resnets.{0,1,2}.conv1`, `up_blocks.1.resnets.0.conv1`) have
  `lokr_w2_a`/`lokr_w2_b`, store alpha 8 and have s = 2; in PEFT's `lokr` (same structure) every
  module has s = 8/4 = 2.

### DoRA (PEFT `LORA` with `use_dora: true`; LyCORIS `locon` with `dora_wd`)

PEFT (lora/dora.py, lora/variants.py):
* Linear: `lora_A.weight` [r, in], `lora_B.weight` [out, r], `lora_magnitude_vector` [out].
  Conv2d: `lora_A.weight` [r, in, kh, kw] (a conv with the base layer's kernel, stride, padding),
  `lora_B.weight` [out, r, 1, 1], `lora_magnitude_vector` [1, out, 1, 1].
* ΔW = B.view(out, r) @ A.view(r, −1), reshaped to W's shape; s = lora_alpha / r (8/4 = 2;
  `use_rslora` false).
* V = W + s·ΔW; n = ‖V‖₂ per **output channel**: Linear `norm(V, dim=1)`, conv norm over dims
  (1, 2, 3) (in, kh, kw) — i.e. `flat(V)` row norms, no epsilon. **n is detached** (treated as a
  constant for the gradient, DoRA paper §4.3) in the forward; the magnitude m gets gradients.
* Forward: y = base(x) + (m/n − 1)·(W x) + (m/n)·s·B(A(x)), which is y = (m/n)·(V x) + bias.
  Merge: W' = (m/n)[:, None(, None, None)] · V; the bias is not scaled.
* At creation m = ‖W‖ row norms (B = 0); here m was perturbed (see Randomisation).

LyCORIS (`weight_decompose`, functional/general.py `weight_decompose`):
* `lora_down.weight` [r, in] or [r, in, kh, kw], `lora_up.weight` [out, r] or [out, r, 1, 1],
  `alpha` [], `dora_scale`: with `wd_on_output=True` (the kohya default, used here) [out, 1]
  (Linear) or [out, 1, 1, 1] (conv); with wd_on_output=False it would be [1, in] /
  [1, in, 1, 1] (norm per input channel over (out, kh, kw)); tell them apart by the shape.
* V = W + s·(up.view(out, r) @ down.view(r, −1)), s = alpha / r (r = down.shape[0]);
  n = ‖flat(V) row‖₂ + ε with ε = `torch.finfo(float32).eps` (1.1920929e-07) — note the epsilon
  PEFT does not add; W' = V · dora_scale / n. LyCORIS does **not** detach n.
* Forward (rebuild mode) = base(x) + op(x, W' − W): the bias is unchanged.

### OFT, PEFT (`OFT`, oft/layer.py) — rotates the **input** side

* Config fields (0.21 defaults unless the case says otherwise): `r=0`, `oft_block_size=32` (only
  one of r / oft_block_size may be non-zero; the other is derived), `module_dropout=0.0`
  (multiplicative: sets whole blocks to I in training), `coft=False`, `eps=6e-05`,
  `block_share=False`, `use_cayley_neumann=True` (the docstring says the default is False; the
  field default is True), `num_cayley_neumann_terms=5`, `bias="none"`, `init_weights=True`
  (zeros → R = I), `fan_in_fan_out=False`.
* Rotated dimension: D = in_features for Linear; for Conv2d D = in·kh·kh (`conv_filter_dim`,
  computed with kernel_size[0] twice). Block size b (= oft_block_size, adjusted to a divisor of
  D if needed), n_blocks = D / b. `oft_R.weight` [n_blocks, b(b−1)/2] (block_share: [1, ...]).
  Here b = 32 → Linear 32-in: 1 block, 64-in: 2 blocks; proj_in 1x1: D = 32 or 64;
  conv1 3x3: D = 9·in → 9 (in 32), 18 (64), 27 (96), 36 (128) blocks; `oft_cayley`: b = 8.
* Skew matrix per block: Q[i, j] = vec[k] for the k-th pair (i < j) in `torch.triu_indices(b, b, 1)`
  order (row-major upper triangle: (0,1), (0,2), …, (0,b−1), (1,2), …), Q[j, i] = −Q[i, j],
  diagonal 0.
* coft (`oft_coft`): before the rotation, each block's Q is projected onto the Frobenius ball of
  radius eps' = eps / √n_blocks: if ‖Q‖_F ≤ eps' keep it, else Q ← eps' · Q / ‖Q‖_F (‖·‖_F of the
  full skew matrix, i.e. √2·‖vec‖). PEFT writes the projected values back into `oft_R.weight`
  (in place, no grad) at every forward/merge, so a saved coft file usually already holds
  projected values; the projection is idempotent, apply it anyway.
* Cayley–Neumann (default): R = I + 2Q + 2Q² + 2Q³ + Q⁴ for T = `num_cayley_neumann_terms` = 5
  (PEFT's loop: T ≥ 4 gives I + 2Σ_{k=1}^{T−2} Q^k + Q^{T−1}; T = 3 gives I + 2Q + 2Q² + Q³, the
  same as T = 4; T = 2: I + 2Q; T = 1: I). This is a truncated series of (I + Q)(I − Q)^{-1}
  (checked numerically), not exactly orthogonal.
  Exact Cayley (`use_cayley_neumann=False`, case `oft_cayley`): R = (I − Q)(I + Q)^{-1}
  (`torch.linalg.solve(I + Q, I − Q, left=False)`) — the **opposite sign convention** of the
  Neumann branch (to first order R ≈ I − 2Q vs I + 2Q), so the same weights rotate the other way
  depending on this flag.
* R_full = block_diag(R_1, …, R_n) [D, D] (block_share: the one block repeated).
* Merged (and unmerged for Linear / 1x1 conv): W' = flat(W) @ R_fullᵀ, reshaped back (PEFT merge:
  `W'ᵀ = R_full @ Wᵀ`). Unmerged Linear: x' = x reshaped to [..., n_blocks, b], x'_blk = x_blk @ R_blk
  (einsum `"...rk,rkc->...rc"`), then y = base(x'), so y = W R_fullᵀ x + bias (bias unrotated).
* **OFT conv quirk (PEFT 0.21.2)**: for a kxk conv with k > 1 the unmerged forward does
  `x.unfold` (stride 1, padding 0) → rotate each patch → `F.fold` back (which **sums** the
  overlapping patches) → base conv. That is not the merged operator: already at R = I it
  multiplies each input pixel by the number of kxk windows covering it (9 in the interior of a
  3x3), so the output is wrong even at initialisation. Hence case `oft_conv3x3`:
  `out_oft_conv3x3` is PEFT's (broken) unmerged forward, `out_oft_conv3x3_merged` the proper
  OFT operator W' = flat(W) R_fullᵀ, which is what the formula check reproduces. Implement the
  merged semantics and compare with `out_oft_conv3x3_merged`. 1x1 convs are exact (each pixel is
  one patch).

### OFT, LyCORIS (`diag-oft`, modules/diag_oft.py) — rotates the **output** side

* (block_size, n_blocks) = factorization(out, network_dim) with LyCORIS's swap, so block_size =
  min(f, out/f) when f divides out: network_dim 8 gives out 32 → 8 blocks of 4, out 64 → 8
  blocks of 8. `oft_blocks` [n_blocks, block_size, block_size] (full matrices, not a triangle),
  `alpha` [] = the `constraint` kwarg (0 = none).
* Q = B − Bᵀ per block (so only B's antisymmetric part matters). Constraint: c = alpha · out; if
  c > 0 and ‖Q‖_F + 1e-8 > c (‖·‖_F over **all blocks together**), Q ← Q · c / (‖Q‖_F + 1e-8).
  `oft_constrained_lycoris` uses alpha = 2⁻⁸ = 0.00390625 (c = 0.125 for out 32, 0.25 for
  out 64), active on every module.
* R = (I + Q)(I − Q)^{-1} (exact, computed with `inverse()`).
* W' = einsum(`"knm,kn...->km..."`, R, W.view(n_blocks, block_size, ...)): for block k,
  W'_k = R_kᵀ W_k, the rows (output channels) k·bs … k·bs+bs−1 mixed; conv kernels rotate as a
  whole ([bs, in, kh, kw] per block). Rebuild forward = base(x) + op(x, W' − W), so the bias is
  not rotated (LyCORIS's bypass mode, not used here, would rotate base(x) including the bias).

### LyCORIS merge quirk

LyCORIS 4.1.3's `merge_to` / `get_merged_weight` for LoHa and LoKr calls `get_diff_weight`, which
multiplies `get_weight()` (already scaled by s) by s again: the merged weight is W + s²·ΔW₀
instead of W + s·ΔW₀. It only agrees with the forward when s = 1. So `out_loha_lycoris_merged`
etc. are not stored where they disagree (see the table); the forward (s applied once) is the
convention ComfyUI/A1111 loaders use, and is what `out_<case>_lycoris` holds. LoCon/DoRA and
diag-OFT merge correctly.

### LyCORIS loader quirk

LyCORIS 4.1.3's `create_network_from_weights` cannot reload a LoKr module whose w1 is full while
w2 uses the Tucker form (`lokr_w1` + `lokr_t2`): it takes the rank from `lokr_w2_a.shape[1]`,
which is b there (not r), rebuilds a full-w2 module and fails. `lokr_both_lycoris` therefore uses
r = 1 with factor 4, where every w1 is decomposed (all 66 modules have `lokr_w1_a`/`lokr_w1_b`,
the 12 3x3 convs `lokr_t2`). Full-w1 + Tucker-w2 modules are still valid files (LyCORIS trains
them, and the formula above covers them): PEFT's `lokr_cp` has them
(`up_blocks.*.resnets.*.conv1`: `lokr_w1` [8, 8] + `lokr_t2`, same key names and shapes as
LyCORIS).

### LyCORIS loader quirk 2

`create_network_from_weights` first builds an empty `LycorisNetworkKohya` with the class-level
default targets; on a diffusers SD-1.x UNet those match `time_embedding.linear_1` twice (module
class `TimestepEmbedding` and name `time_embedding.linear_1`) and its duplicate-name assertion
fails, unless a preset was applied before. The checker (and the generator's reload check) applies
an empty preset first; the file's modules are unaffected.
"""


# ------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", default=DEFAULT_UNET)
    ap.add_argument("--inputs", default=DEFAULT_INPUTS)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", default="", help="comma-separated case names (tuning; with --out elsewhere)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore")
    quiet_lycoris()

    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)

    g = load_file(args.inputs)
    inp = {k: g[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    base = run(load_unet(args.unet), inp)
    if "out_base" in g:
        assert rel_err(base, g["out_base"]) < 1e-6, rel_err(base, g["out_base"])
    tensors = dict(inp, out_base=base)
    report = {"peft": {}, "lycoris": {}}

    for name, spec in PEFT_CASES.items():
        if only and name not in only:
            continue
        peft_case(name, spec, args, inp, tensors, report)
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in LYCORIS_CASES.items():
            if only and name + "_lycoris" not in only:
                continue
            lycoris_case(name, spec, args, inp, tensors, report, tmp)

    meta = {"inputs": "copied from shared/golden/tensors/unet_ia3.safetensors",
            "unet": "shared/golden/tiny-sd/unet", "versions": versions(), "tolerance": TOL, **report}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, "unet_methods.safetensors"),
              metadata={"golden": json.dumps(meta, sort_keys=True, default=str)})

    sizes = []
    for root, _, files in sorted(os.walk(args.out)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            sizes.append((os.path.relpath(p, args.out), os.path.getsize(p)))
    write_readme(args, report, sizes)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out}: {total} bytes")
    for rel, sz in sizes:
        print(f"  {rel:60s} {sz:>9d}")
    for grp in ("peft", "lycoris"):
        for n, c in report[grp].items():
            if not 0.03 <= c["rel_change"] <= 0.5:
                print(f"note: {grp} {n} rel change {c['rel_change']:.4f} outside [0.03, 0.5]")


def versions():
    import diffusers
    import peft

    try:
        from importlib.metadata import version

        lyc = version("lycoris-lora")
    except Exception:
        lyc = "?"
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__, "lycoris": lyc}


if __name__ == "__main__":
    main()
