#!/usr/bin/env bash
# The GPU table of the engine issue, one H100 / H200, in one go (budget: under 8 minutes).
#
#   bash benchmarks/gpu_suite.sh            # the table -> benchmarks/results/gpu/*.json + suite.log
#   bash benchmarks/gpu_suite.sh --tests    # ... then the gpu-marked tests (pytest -m gpu)
#   bash benchmarks/gpu_suite.sh --dry-run  # print the offline.py commands, run nothing
#
# Shapes of LLaDA-8B-Instruct and Dream-v0-Instruct-7B with random bf16 weights (no download),
# (and SDAR-4B for block diffusion, benchmarks/sdar_offline.py, last),
# prompt 512, generation 256, block 32, every cache mode (none, prefix, dual):
#   batch 1, one token per step (the fixed schedule: 256 steps);
#   batch 64, four tokens per step, measured: --scripted-tpf 4 (benchmarks/scripted_model.py
#   makes the threshold policy commit 4 per forward; Dream's cached modes commit 1 at each
#   block's refresh, as Fast-dLLM does).
# The reference loop is skipped (the engine's "none" mode computes the same forwards).
# Interpreter: $PYTHON, else .venv/bin/python, else python.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/benchmarks/results/gpu"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python; fi
fi
RUN_TESTS=0
DRY=0
for arg in "$@"; do
  case "$arg" in
    --tests) RUN_TESTS=1 ;;
    --dry-run) DRY=1 ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (use --tests, --dry-run or nothing)" >&2
       exit 2 ;;
  esac
done

if [[ "$DRY" == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_suite.sh: no CUDA device visible to torch ($PY): this suite needs one H100/H200." >&2
  echo "  On CPU run benchmarks/offline.py with the tiny model instead (docs/engine.md)." >&2
  exit 1
fi

LOG="$OUT/suite.log"
if [[ "$DRY" == 0 ]]; then mkdir -p "$OUT"; : > "$LOG"; fi
START=$SECONDS
COMMON=(--prompt-len 512 --gen-len 256 --block-len 32 --skip-reference)

# run NAME ARGS...: one offline.py run, JSON to $OUT/NAME.json, its printed lines to the log
# (stdout); progress bars and errors (stderr) to the terminal only
run() {
  local name="$1"; shift
  if [[ "$DRY" == 1 ]]; then
    echo "benchmarks/offline.py ${COMMON[*]} $* --json benchmarks/results/gpu/$name.json"
    return
  fi
  echo "== $name ($((SECONDS - START)) s elapsed)" | tee -a "$LOG"
  "$PY" "$ROOT/benchmarks/offline.py" "${COMMON[@]}" "$@" --json "$OUT/$name.json" \
    | tee -a "$LOG"
}

for shape in llada-8b dream-7b; do
  run "$shape-b1-tps1" --random-weights "$shape" --batch 1 --tokens-per-step 1
  run "$shape-b64-tpf4" --random-weights "$shape" --batch 64 --scripted-tpf 4 --warmup-steps 3
done
# the GPU paths side by side, dual cache: CUDA graphs, FlexAttention over the pages, incremental
# refresh (each against the dual rows above)
run "llada-8b-b1-tps1-graphs" --random-weights llada-8b --batch 1 --tokens-per-step 1 \
  --modes dual --cuda-graphs
run "llada-8b-b64-tpf4-flex" --random-weights llada-8b --batch 64 --scripted-tpf 4 \
  --warmup-steps 3 --modes dual --attention-backend flex
run "llada-8b-b64-tpf4-incremental" --random-weights llada-8b --batch 64 --scripted-tpf 4 \
  --warmup-steps 3 --modes dual --refresh incremental
# block diffusion: the SDAR-4B shape, 64 requests, both block-store orders (printed table only)
SDAR=(--random-weights sdar-4b --device cuda --dtype bfloat16 --batch 64 --prompt-len 512
      --gen-len 256 --max-len 1024 --skip-reference --no-progress)
if [[ "$DRY" == 1 ]]; then
  echo "benchmarks/sdar_offline.py ${SDAR[*]}"
  exit 0
fi
echo "== sdar-4b-b64 ($((SECONDS - START)) s elapsed)" | tee -a "$LOG"
"$PY" "$ROOT/benchmarks/sdar_offline.py" "${SDAR[@]}" | tee -a "$LOG"
echo "== table done in $((SECONDS - START)) s; JSON in benchmarks/results/gpu/" | tee -a "$LOG"
if (( SECONDS - START > 480 )); then
  echo "== over the 8-minute budget: trim the batch-64 no-cache runs (--modes)" | tee -a "$LOG"
fi

if [[ "$RUN_TESTS" == 1 ]]; then
  (cd "$ROOT" && "$PY" -m pytest -q -m gpu tests) 2>&1 | tee -a "$LOG"
fi
