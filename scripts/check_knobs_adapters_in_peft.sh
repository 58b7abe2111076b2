#!/usr/bin/env bash
# Adapters written by knobs (PEFT folders of LoHa, LoKr, DoRA, OFT; LyCORIS files of LoHa, LoKr,
# DoRA) loaded by PEFT 0.21 / LyCORIS 4.1 give knobs' UNet output on tiny-sd.
# Needs the Python reference stack (see scripts/make_adapter_method_goldens.py) in $PY.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/tmp/ref-venv/bin/python}
OUT=${1:-$(mktemp -d)}
KNOBS_EXPORT_DIR=$OUT cargo test -q -p knobs-diffusion --test adapter_methods_golden export_knobs_adapters_for_peft -- --ignored --nocapture
args=()
for d in "$OUT"/*_peft; do args+=(--peft "$d"); done
for f in "$OUT"/*_lycoris.safetensors; do args+=(--lycoris "$f"); done
"$PY" scripts/check_adapter_files_in_peft.py --unet ../shared/golden/tiny-sd/unet \
    --inputs "$OUT/expect.safetensors" --expect "$OUT/expect.safetensors" "${args[@]}"
