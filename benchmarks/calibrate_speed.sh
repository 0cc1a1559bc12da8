#!/usr/bin/env bash
# Calibrate + convert time of one calibrated quantization on the default model at two commits, measured by one command
# on one machine, and the perplexity of both engines (the accuracy check of a speed change):
#   benchmarks/calibrate_speed.sh BEFORE_COMMIT AFTER_COMMIT w4a16_awq [extra overrides...]
#   benchmarks/calibrate_speed.sh BEFORE_COMMIT AFTER_COMMIT w4a16_gptq
# Each commit is checked out into a temporary git worktree and runs the `smollm2_quant_ppl` experiment (groups of 64)
# with its own empty cache: calibrate -> convert -> build -> evaluate (perplexity, 16 windows of 256 tokens). Prints
# the calibrate and convert stage seconds of both, their ratio (after / before) and both perplexities.
# PPL=0 stops after convert (timing only).
set -euo pipefail
before=$1 after=$2 quant=$3; shift 3
repo=$(git rev-parse --show-toplevel)
source "$(dirname "$0")/python.sh"
work=$(mktemp -d)
trap 'for c in before after; do git -C "$repo" worktree remove --force "$work/$c" 2>/dev/null || true; done; rm -rf "$work"' EXIT
stages='[convert,build,evaluate]'
[[ "${PPL:-1}" == 0 ]] && stages='[convert]'
declare -A secs ppl
for side in after before; do
  commit=${!side}
  git -C "$repo" worktree add --detach -q "$work/$side" "$commit"
  (cd "$work/$side" && PYTHONPATH="$work/$side" "$PY" -m pipeline.cli progress=false cache_dir="$work/cache_$side" \
      hydra.run.dir="$work/run_$side" +experiment=smollm2_quant_ppl quantization="$quant" "stages=$stages" "$@" \
      > "$work/$side.log" 2>&1) || { cat "$work/$side.log"; exit 1; }
  # the run summary's stage table: "<stage> computed <seconds> <artifact>"
  calib=$(awk '$1 == "calibrate" && $2 == "computed" {print $3}' "$work/$side.log")
  conv=$(awk '$1 == "convert" && $2 == "computed" {print $3}' "$work/$side.log")
  [[ -n "$calib" && -n "$conv" ]] || { echo "no calibrate/convert timings in the $side run:"; cat "$work/$side.log"; exit 1; }
  secs[$side]=$(echo "$calib + $conv" | bc)
  ppl[$side]=$(grep -o 'engine_ppl=[0-9.]*' "$work/$side.log" | head -n 1 | cut -d= -f2 || true)
  echo "$side ($commit) $quant: calibrate ${calib} s + convert ${conv} s = ${secs[$side]} s; perplexity ${ppl[$side]:--}"
done
echo "ratio after/before (calibrate + convert): $(echo "scale=3; ${secs[after]} / ${secs[before]}" | bc)"
if [[ -n "${ppl[after]}" && -n "${ppl[before]}" ]]; then
  echo "perplexity after/before: $(echo "scale=5; ${ppl[after]} / ${ppl[before]}" | bc)"
fi
