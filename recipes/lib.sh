# Sourced by recipes/*.sh: where to run, which python and launcher, and three helpers.
#   step DONE CMD...   print CMD; run it unless DRY_RUN=1 or DONE exists (a stage that already finished: every
#                      stage writes its manifest.json last, so re-running a recipe after a failure resumes it)
#   plan ARGS...       print a training stage's plan (recipes/plan.py: tokens, steps, accumulation, GPU-hours);
#                      in a real run it stops the recipe if the step does not divide over the GPUs
#   last_checkpoint OUT STEP   the directory 03 writes for step STEP of the run in OUT
#   prepare_shards DIR N CMD...   CMD (01) once per shard into DIR/shard-K (--num-shards N --shard-index K), then
#                      01 --merge-report DIR --out DIR-report; 03 and 04 read DIR, the folder of shards
# Environment: DRY_RUN=1 prints the plan and the commands and runs nothing; PY (default .venv/bin/python, else
# python3); GPUS_PER_NODE (8) and NNODES (1); LAUNCH, the torchrun line (default: one node, GPUS_PER_NODE
# processes; for several nodes set it to your own `torchrun --nnodes ... --rdzv_endpoint ...`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${DRY_RUN:=0}"
if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
: "${GPUS_PER_NODE:=8}"
: "${NNODES:=1}"
: "${LAUNCH:=$PY -m torch.distributed.run --standalone --nproc_per_node=$GPUS_PER_NODE}"
NGPUS=$((GPUS_PER_NODE * NNODES))
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {
  local done=$1
  shift
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  if [[ -e $done ]]; then
    echo "  (skipped: $done exists; delete it to redo this stage)"
    return 0
  fi
  "$@"
}

plan() {  # a real run stops here if the step does not divide over the GPUs; DRY_RUN=1 only marks it
  local check=--check
  if [[ $DRY_RUN == 1 ]]; then check=; fi
  "$PY" recipes/plan.py --gpus-now "$NGPUS" $check "$@"
}

# The checkpoint directory 03 writes after its last step (for --init-from of the next stage).
last_checkpoint() { printf '%s/checkpoints/step_%08d' "$1" "$2"; }

# 01 as N shards (one per machine: each `step` can run anywhere, a finished shard is skipped), then one report.
prepare_shards() {
  local dir=$1 n=$2 k
  shift 2
  for ((k = 0; k < n; k++)); do
    step "$dir/shard-$k/manifest.json" "$@" --num-shards "$n" --shard-index "$k" --out "$dir/shard-$k"
  done
  step "$dir-report/manifest.json" "$PY" 01_prepare_data.py --merge-report "$dir" --out "$dir-report"
}
