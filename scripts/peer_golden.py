"""PyTorch's own distance from the UNet golden on a device, to read knobs' beside: the tiny-sd
UNet (GOLDEN/tiny-sd) run by diffusers on --device with the golden's inputs
(GOLDEN/tensors/unet.safetensors, made by diffusers on the CPU in f32), measured as
tests/device_parity.rs measures knobs: the largest difference relative to the golden's largest
value, for the output and the worst of the block outputs the golden holds.

One line per run: f32 with TF32 off, f32 as PyTorch leaves it (TF32 for cuDNN convolutions,
not for matrix products), f32 with TF32 on for both, and fp16 / bf16 under autocast. On a GPU
with TF32 (NVIDIA, compute capability 8.0 and up) the f32 lines show what TF32 alone does to
this golden; knobs' f32 on CUDA may take TF32 through burn's autotune (README, "GPUs and other
backends"). Prints JSON lines; --device cpu runs it here (where TF32 changes nothing).

    python peer_golden.py [--device cuda] [--golden ../shared/golden]
"""
import argparse, json, os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

here = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda")
p.add_argument("--golden", default=os.path.join(here, "..", "..", "shared", "golden"))
a = p.parse_args()
dev = torch.device(a.device)

golden = load_file(os.path.join(a.golden, "tensors", "unet.safetensors"))
unet = UNet2DConditionModel.from_pretrained(os.path.join(a.golden, "tiny-sd"), subfolder="unet", torch_dtype=torch.float32).to(dev).eval()
blocks = {"time_proj": unet.time_proj, "time_embedding": unet.time_embedding, "conv_in": unet.conv_in,
          "mid_block": unet.mid_block, "conv_norm_out": unet.conv_norm_out,
          **{f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)},
          **{f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)}}
captured = {}


def keep(name):
    def hook(_module, _inputs, out):
        out = out[0] if isinstance(out, tuple) else out
        captured[name] = getattr(out, "sample", out).detach().float().cpu()

    return hook


for name, module in blocks.items():
    if f"intermediate.{name}" in golden:
        module.register_forward_hook(keep(name))


def rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def run(label, tf32, autocast=None):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    captured.clear()
    inputs = [golden[k].to(dev) for k in ("sample", "timestep", "encoder_hidden_states")]
    with torch.no_grad(), torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
        out = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample.float().cpu()
    worst = max(((rel(t, golden[f"intermediate.{n}"]), n) for n, t in captured.items()), default=(float("nan"), None))
    print(json.dumps({"run": label, "device": str(dev), "tf32": {"matmul": tf32[0], "conv": tf32[1]},
                      "out_rel_err": rel(out, golden["out"]), "worst_block_rel_err": worst[0], "worst_block": worst[1], "blocks": len(captured)}), flush=True)


defaults = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
run("f32, TF32 off", (False, False))
run("f32, PyTorch's default TF32 settings", defaults)
run("f32, TF32 on", (True, True))
for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
    run(f"{name} autocast", defaults, dtype)
