#!/usr/bin/env bash
# Wall time of the default recipe from a clean cache at two commits, measured by one command on one machine:
#   benchmarks/recipe_wall_time.sh BEFORE_COMMIT AFTER_COMMIT [extra overrides...]
# Each commit is checked out into a temporary git worktree and run with its own empty cache; prints both times and
# their ratio (after / before).
set -euo pipefail
before=$1 after=$2; shift 2
repo=$(git rev-parse --show-toplevel)
source "$(dirname "$0")/python.sh"
work=$(mktemp -d)
trap 'for c in before after; do git -C "$repo" worktree remove --force "$work/$c" 2>/dev/null || true; done; rm -rf "$work"' EXIT
declare -A secs
for side in after before; do
  commit=${!side}
  git -C "$repo" worktree add --detach -q "$work/$side" "$commit"
  start=$(date +%s.%N)
  (cd "$work/$side" && PYTHONPATH="$work/$side" "$PY" -m pipeline.cli progress=false cache_dir="$work/cache_$side" \
      hydra.run.dir="$work/run_$side" "$@" > "$work/$side.log" 2>&1) || { cat "$work/$side.log"; exit 1; }
  secs[$side]=$(echo "$(date +%s.%N) - $start" | bc)
  tail -n 12 "$work/$side.log"
  echo "$side ($commit): ${secs[$side]} s"
done
echo "ratio after/before: $(echo "scale=3; ${secs[after]} / ${secs[before]}" | bc)"
