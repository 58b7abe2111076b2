#!/usr/bin/env python3
"""Check adapter files against golden UNet outputs with the reference libraries.

Each `--peft DIR` (a PeftModel.save_pretrained folder of any peft_type PEFT can load: LOHA, LOKR,
OFT, LORA incl. use_dora, ...) is loaded with `PeftModel.from_pretrained` into a fresh UNet; each
`--lycoris FILE` (a kohya-style `lora_unet_...` single file: LoHa, LoKr, LoCon/DoRA, diag-OFT,
...) with `lycoris.kohya.create_network_from_weights` + `apply_to`. The UNet is run on the inputs
(`sample`, `timestep`, `encoder_hidden_states` of --inputs) and the output is compared with the
tensor `out_<name>` of --expect:

  * PEFT folder `.../X_peft` (or `.../X`)   -> `out_X`      (a trailing `_peft` is stripped)
  * LyCORIS file `.../Y.safetensors`        -> `out_Y`      (`loha_lycoris.safetensors` -> `out_loha_lycoris`)
  * `PATH=NAME` (either option)             -> `out_NAME`

Prints max|out - expected| / max|expected| per item and exits 1 if any is above --tol (1e-4) or an
expected tensor is missing. With --merged, PEFT items are merged first (merge_and_unload) and
compared with `out_<name>_merged`.

    /tmp/ref-venv/bin/python scripts/check_adapter_files_in_peft.py \
        --unet ../shared/golden/tiny-sd/unet \
        --inputs crates/knobs-diffusion/tests/fixtures/adapter_methods/unet_methods.safetensors \
        --peft crates/knobs-diffusion/tests/fixtures/adapter_methods/loha_peft \
        --lycoris crates/knobs-diffusion/tests/fixtures/adapter_methods/loha_lycoris.safetensors \
        --expect crates/knobs-diffusion/tests/fixtures/adapter_methods/unet_methods.safetensors

Needs torch, diffusers, peft, lycoris-lora (+ einops, toml); runs offline on CPU.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import logging
import sys
import warnings

import torch
from safetensors.torch import load_file


def split_name(item, strip_suffix):
    if "=" in item:
        path, name = item.rsplit("=", 1)
        return path, name
    path = item.rstrip("/")
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if strip_suffix and name.endswith(strip_suffix):
        name = name[: -len(strip_suffix)]
    return path, name


def load_unet(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, local_files_only=True).eval()


@torch.no_grad()
def run(model, inp):
    return model(inp["sample"], inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"]).sample


def peft_output(unet_path, folder, inp, merged):
    import json

    from peft import PeftModel

    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    model = PeftModel.from_pretrained(load_unet(unet_path), folder).eval()
    if merged:
        model = model.merge_and_unload()
    kind = cfg.get("peft_type", "?") + ("+dora" if cfg.get("use_dora") else "")
    return run(model, inp), kind


def lycoris_output(unet_path, file, inp, merged):
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # LyCORIS 4.1.3 quirk: create_network_from_weights first builds an empty network with the
    # class-level default targets, which on a diffusers SD UNet match `time_embedding.linear_1`
    # twice (module class TimestepEmbedding and name) and trip its duplicate-name assertion.
    # The modules themselves come from the file, so target nothing for that shell network.
    LycorisNetworkKohya.apply_preset({"unet_target_module": [], "unet_target_name": [],
                                      "text_encoder_target_module": [], "text_encoder_target_name": []})
    unet = load_unet(unet_path)
    net, weights = create_network_from_weights(1.0, file, None, None, unet, for_inference=True)
    if not net.unet_loras:
        raise RuntimeError(f"{file}: no lora_unet_* module of this UNet found")
    if merged:
        net.merge_to(None, unet, weights, torch.float32, "cpu")
    else:
        net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    kinds = sorted({type(m).__name__ for m in net.unet_loras})
    return run(unet, inp), f"{'+'.join(kinds)} x{len(net.unet_loras)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--unet", required=True, help="diffusers UNet2DConditionModel folder")
    ap.add_argument("--inputs", required=True, help="safetensors with sample, timestep, encoder_hidden_states")
    ap.add_argument("--peft", action="append", default=[], metavar="DIR[=NAME]")
    ap.add_argument("--lycoris", action="append", default=[], metavar="FILE[=NAME]")
    ap.add_argument("--expect", required=True, help="safetensors holding out_<name> tensors")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--merged", action="store_true",
                    help="merge first (PEFT merge_and_unload / LyCORIS merge_to); compare with out_<name>_merged")
    args = ap.parse_args()
    if not args.peft and not args.lycoris:
        ap.error("give at least one --peft or --lycoris")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore")
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    try:
        from lycoris.logging import logger as lycoris_logger

        lycoris_logger.setLevel(logging.ERROR)
    except ImportError:
        pass

    src = load_file(args.inputs)
    inp = {k: src[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    expect = load_file(args.expect)
    if "out_base" in expect:
        e = ((run(load_unet(args.unet), inp) - expect["out_base"]).abs().max() / expect["out_base"].abs().max()).item()
        print(f"{'base':24s} {'(no adapter)':28s} max rel err {e:.3e} vs out_base")

    items = [("peft", *split_name(x, "_peft")) for x in args.peft]
    items += [("lycoris", *split_name(x, None)) for x in args.lycoris]
    failed = 0
    for lib, path, name in items:
        key = f"out_{name}" + ("_merged" if args.merged else "")
        if key not in expect:
            print(f"{name:24s} FAIL: no tensor `{key}` in {args.expect}")
            failed += 1
            continue
        try:
            fn = peft_output if lib == "peft" else lycoris_output
            out, kind = fn(args.unet, path, inp, args.merged)
        except Exception as exc:  # report and go on with the other items
            print(f"{name:24s} FAIL: could not load {path} with {lib}: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        ref = expect[key]
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        ok = err <= args.tol
        failed += not ok
        print(f"{name:24s} {lib + ' ' + kind:28s} max rel err {err:.3e} vs {key} {'ok' if ok else 'FAIL'}")
    print(f"{len(items) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
