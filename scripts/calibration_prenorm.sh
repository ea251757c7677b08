#!/usr/bin/env bash
# Does gate calibration help on a pre-norm (Llama-family) anchor? Calibrates the demo's code
# expert (trained without calibration) with the flexmoe recipe's setting (public weight 4), then
# compares held-out BPB of public + that expert, calibrated vs not, on the demo's tokens.
# Needs a finished `make demo` (runs/demo). Usage: bash scripts/calibration_prenorm.sh [DOMAIN]
set -euo pipefail
d=${1:-code}
run=runs/demo
out=runs/calibration-prenorm
F=".venv/bin/flexmoe"
$F expert calibrate "$run/experts/$d" --anchor "$run/anchor" --data "$run/tokens/$d/train" \
    --public "$run/tokens/public/train" --public-weight 4 -o "$out/$d-calibrated" --overwrite
for v in experts/$d "$out/$d-calibrated"; do
  pkg=$v; [ -d "$pkg" ] || pkg="$run/$v"
  name=$(basename "$pkg")
  $F merge --anchor "$run/anchor" --experts "$pkg" -o "$out/merged-$name" --overwrite >/dev/null
  echo "== public + $d ($name)"
  $F eval bpb --model "$out/merged-$name" --data "$run/tokens" --seq-len 256 --max-tokens 2048 \
      --preselect 0 --no-unigram --dtype float32 2>/dev/null | grep -E "public|$d|domain"
done
