"""Golden trajectories for knobs' memory-lean optimizers, written to
crates/knobs-nn/tests/fixtures/optimizers.safetensors (read by crates/knobs-nn/tests/optimizers.rs):

- transformers' Adafactor, four settings, on parameters of shapes [7], [5, 6] and [2, 3, 4, 5],
  five steps of fixed gradients (one step with gradients 100x larger, to reach the clipping):
  `adafactor.<setting>.<shape>.param.<t>` after step t (t = 0 is the start), the gradients in
  `grad.<shape>.<t>`, each setting's keyword arguments in the metadata.
- bitsandbytes' AdamW8bit on a [40, 110] weight (8-bit moments, 17 full blocks and a partial one)
  and a [7] bias (f32 moments, under bitsandbytes' 4096-value threshold), six steps:
  `<variant>.<name>.param.<t>` (t = 0, 1, 6) and `grad8.<name>.<t>`, the final moments
  (`state1`/`state2` codes as f32, `absmax1`/`absmax2`) and both quantisation maps (`qmap.signed`,
  `qmap.unsigned`). Variant `adamw8bit` runs the optimizer's updates through bitsandbytes'
  pure-PyTorch reference of the blockwise update (nearest-code rounding, as its CUDA kernel);
  `adamw8bit_cpu` through its CPU library as shipped.

Usage: TORCHDYNAMO_DISABLE=1 python scripts/optimizer_goldens.py [OUT]
       (torch, transformers, bitsandbytes >= 0.49 with triton importable, safetensors)
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers.optimization import Adafactor

import bitsandbytes as bnb
import bitsandbytes.functional as F
from bitsandbytes.backends.triton.kernels_optim import optimizer_update_8bit_blockwise_pytorch

out = sys.argv[1] if len(sys.argv) > 1 else "crates/knobs-nn/tests/fixtures/optimizers.safetensors"
gen = torch.Generator().manual_seed(17)
tensors, meta = {}, {}

SHAPES = {"v7": [7], "m5x6": [5, 6], "t2x3x4x5": [2, 3, 4, 5]}
STEPS = 5
SETTINGS = {
    "defaults": dict(),
    "lr": dict(lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.1),
    "lr_scaled_beta1": dict(lr=3e-2, relative_step=False, scale_parameter=True, beta1=0.9),
    "warmup_beta1": dict(relative_step=True, warmup_init=True, beta1=0.8, weight_decay=0.01),
}

start = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
grads = {k: [torch.randn(s, generator=gen) * (100.0 if t == 2 else 1.0) for t in range(STEPS)] for k, s in SHAPES.items()}
for k in SHAPES:
    for t, g in enumerate(grads[k]):
        tensors[f"grad.{k}.{t}"] = g
for name, kwargs in SETTINGS.items():
    meta[f"adafactor.{name}"] = json.dumps(kwargs)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = Adafactor(list(params.values()), **kwargs)
    for k, p in params.items():
        tensors[f"adafactor.{name}.{k}.param.0"] = p.detach().clone()
    for t in range(STEPS):
        for k, p in params.items():
            p.grad = grads[k][t].clone()
        opt.step()
        for k, p in params.items():
            tensors[f"adafactor.{name}.{k}.param.{t + 1}"] = p.detach().clone()

STEPS8 = 6
shapes8 = {"weight": [40, 110], "bias": [7]}
start8 = {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes8.items()}
grads8 = {k: [torch.randn(s, generator=gen) * 0.01 for _ in range(STEPS8)] for k, s in shapes8.items()}
for k in shapes8:
    for t, g in enumerate(grads8[k]):
        tensors[f"grad8.{k}.{t}"] = g
meta["adamw8bit"] = json.dumps(dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2))
shipped_update = F.optimizer_update_8bit_blockwise


def reference_update(name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1, absmax2, weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False):
    """bitsandbytes' own pure-PyTorch 8-bit blockwise update (backends/triton/kernels_optim.py):
    nearest-code rounding, as the CUDA kernel. The CPU library's C quantiser (0.50.2) rounds small
    values (below ~1e-4 of the block's absmax) to a farther code, so it is kept as a second golden."""
    optimizer_update_8bit_blockwise_pytorch(p, g, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2,
                                            absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros, optimizer_name=name)


for variant, update in [("adamw8bit", reference_update), ("adamw8bit_cpu", shipped_update)]:
    F.optimizer_update_8bit_blockwise = update
    params8 = {k: torch.nn.Parameter(v.clone()) for k, v in start8.items()}
    opt8 = bnb.optim.AdamW8bit(list(params8.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    for k, p in params8.items():
        tensors[f"{variant}.{k}.param.0"] = p.detach().clone()
    for t in range(STEPS8):
        for k, p in params8.items():
            p.grad = grads8[k][t].clone()
        opt8.step()
        if t + 1 in (1, STEPS8):
            for k, p in params8.items():
                tensors[f"{variant}.{k}.param.{t + 1}"] = p.detach().clone()
    st = opt8.state[params8["weight"]]
    assert st["state1"].dtype == torch.uint8, "the weight must have 8-bit moments"
    assert opt8.state[params8["bias"]]["state1"].dtype == torch.float32, "the bias keeps f32 moments"
    tensors[f"{variant}.weight.state1"] = st["state1"].float()
    tensors[f"{variant}.weight.state2"] = st["state2"].float()
    tensors[f"{variant}.weight.absmax1"] = st["absmax1"].clone()
    tensors[f"{variant}.weight.absmax2"] = st["absmax2"].clone()
F.optimizer_update_8bit_blockwise = shipped_update
tensors["qmap.signed"] = F.create_dynamic_map(signed=True)
tensors["qmap.unsigned"] = F.create_dynamic_map(signed=False)

meta["made_by"] = f"scripts/optimizer_goldens.py, torch {torch.__version__}, bitsandbytes {bnb.__version__}"
save_file({k: v.contiguous().float() for k, v in tensors.items()}, out, metadata=meta)
print(f"wrote {len(tensors)} tensors to {out}")
