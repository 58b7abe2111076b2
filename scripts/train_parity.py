"""Compares two `knobs train` output folders (a run on the CPU and the same run on another
device): the loss curves (loss.csv) and the LoRA files, each relative to the CPU run, as
knobs-train/tests/device_train.rs does. Exits 1 when either differs by more than --tol.

    python train_parity.py CPU_OUT DEVICE_OUT [--tol 1e-3]
"""
import argparse, csv, os, sys

import numpy as np
from safetensors.numpy import load_file

p = argparse.ArgumentParser()
p.add_argument("cpu")
p.add_argument("device")
p.add_argument("--tol", type=float, default=1e-3)
a = p.parse_args()


def losses(folder):
    with open(os.path.join(folder, "loss.csv")) as f:
        return [float(row[1]) for row in list(csv.reader(f))[1:]]


cpu, dev = losses(a.cpu), losses(a.device)
if len(cpu) != len(dev) or not cpu:
    sys.exit(f"loss.csv: {len(cpu)} CPU steps against {len(dev)} on the device")
loss_err = max(abs((c - d) / c) for c, d in zip(cpu, dev))
wa = load_file(os.path.join(a.cpu, "pytorch_lora_weights.safetensors"))
wb = load_file(os.path.join(a.device, "pytorch_lora_weights.safetensors"))
if wa.keys() != wb.keys():
    sys.exit(f"the LoRA files name different tensors: {sorted(wa.keys() ^ wb.keys())[:5]}")
# Against the file's largest value: AdamW moves a value by about the learning rate whatever its
# gradient's size, so rounding-level gradient differences show per value.
scale = max(float(np.abs(v).max()) for v in wa.values())
weight_err = max(float(np.abs(wa[k].astype(np.float64) - wb[k]).max()) for k in wa) / scale
print(f"losses {dev} against the CPU's {cpu}; worst loss difference {loss_err:.2e}, worst LoRA weight difference {weight_err:.2e}")
sys.exit(0 if loss_err < a.tol and weight_err < a.tol else 1)
