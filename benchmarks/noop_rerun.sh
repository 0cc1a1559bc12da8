#!/usr/bin/env bash
# Wall time of a re-run of the default recipe whose every stage is cached (the "nothing to do" run), including
# interpreter start, for this working tree and a commit before it, measured by one command on one machine:
#   benchmarks/noop_rerun.sh [-n RUNS] [-w WORKDIR] [-p] [-s SEED_CACHE] [BEFORE_COMMIT] [-- extra overrides...]
# BEFORE_COMMIT (default e801d3c) is exported with `git archive` into WORKDIR/before; this tree is used in place.
# Each side has its own cache (WORKDIR/cache_before, WORKDIR/cache_after), populated by one full run of the recipe
# the first time (minutes), or seeded with a copy of SEED_CACHE (-s: a cache of the same recipe, e.g. from an earlier
# run; both commits key the default recipe alike); -p only populates and exits (run that part under a CPU-sharing
# wrapper, the timing part alone on a quiet machine). Both trees are byte-compiled first, as an installed package
# is. One untimed run per side must reuse every stage (else it stops before timing); then the runs alternate
# before/after; prints every run, the medians and their ratio.
# The command is the console script users type (`trtllm-pipeline`), pointed at each tree with PYTHONPATH.
set -euo pipefail
runs=7 work=${TMPDIR:-/tmp}/noop_rerun populate_only=0 seed=""
while getopts "n:w:ps:" opt; do
  case $opt in
    n) runs=$OPTARG ;;
    w) work=$OPTARG ;;
    p) populate_only=1 ;;
    s) seed=$(cd "$OPTARG" && pwd) ;;
    *) echo "usage: $0 [-n RUNS] [-w WORKDIR] [-p] [-s SEED_CACHE] [BEFORE_COMMIT] [-- overrides...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
before=e801d3c
if [ $# -gt 0 ] && [ "$1" != "--" ]; then before=$1; shift; fi
[ "${1:-}" = "--" ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/benchmarks/python.sh"
mkdir -p "$work"
work=$(cd "$work" && pwd)

# The before tree: exported once per commit (a marker file names the commit it holds).
if [ "$(cat "$work/before/.commit" 2>/dev/null)" != "$(git -C "$repo" rev-parse "$before")" ]; then
  rm -rf "$work/before" "$work/cache_before"
  mkdir -p "$work/before"
  git -C "$repo" archive "$before" | tar -x -C "$work/before"
  git -C "$repo" rev-parse "$before" > "$work/before/.commit"
fi
declare -A tree=([before]="$work/before" [after]="$repo")
for side in before after; do
  "$PY" -m compileall -q "${tree[$side]}/pipeline" > /dev/null
done

cli() {  # cli SIDE LOG: one run of the recipe with SIDE's code and cache
  (cd "$work" && PYTHONPATH="${tree[$1]}" "$BIN/trtllm-pipeline" progress=false cache_dir="$work/cache_$1" \
      hydra.run.dir="$work/run_$1" "${overrides[@]}" > "$2" 2>&1)
}
overrides=("$@")
for side in before after; do
  if [ -n "$seed" ]; then
    rm -rf "$work/cache_$side" && cp -a "$seed" "$work/cache_$side" && touch "$work/cache_$side/.populated"
  elif [ ! -f "$work/cache_$side/.populated" ]; then
    echo "populating the $side cache (one full run of the recipe)..."
    cli "$side" "$work/populate_$side.log" || { tail -n 20 "$work/populate_$side.log"; exit 1; }
    touch "$work/cache_$side/.populated"
  fi
done
[ "$populate_only" = 1 ] && { echo "caches populated under $work"; exit 0; }
computed() { grep -E '^(calibrate|convert|build|reference|evaluate) +computed' "$1"; }
for side in before after; do  # untimed: a side that would compute a stage is not a no-op run
  cli "$side" "$work/warmup_$side.log" || { tail -n 20 "$work/warmup_$side.log"; exit 1; }
  if computed "$work/warmup_$side.log"; then echo "the $side run computed a stage: not a no-op run" >&2; exit 1; fi
done

declare -A times=([before]="" [after]="")
for i in $(seq "$runs"); do
  for side in before after; do
    start=$(date +%s%N)
    cli "$side" "$work/rerun_$side.log" || { cat "$work/rerun_$side.log"; exit 1; }
    t=$(( ($(date +%s%N) - start) / 1000000 ))
    times[$side]+="$t "
    printf 'run %d %-6s %6.3f s\n' "$i" "$side" "$(echo "scale=3; $t / 1000" | bc)"
  done
done
for side in before after; do
  if computed "$work/rerun_$side.log"; then echo "the $side re-run computed a stage: not a no-op run" >&2; exit 1; fi
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.3f", m / 1000}'; }
mb=$(echo "${times[before]}" | median) ma=$(echo "${times[after]}" | median)
echo "median before ($before): $mb s   after ($(git -C "$repo" rev-parse --short HEAD)+tree): $ma s   ratio after/before: $(echo "scale=3; $ma / $mb" | bc)"
