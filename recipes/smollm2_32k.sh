#!/usr/bin/env bash
# A student's first context extension, on ONE GPU in under an hour: SmolLM2-135M-Instruct from its 8K window to
# 32K (4x), the way UltraLong and AFM-4.5B did it (YaRN relative to the original length, then continued
# pretraining on long documents), with needle retrieval at 8K / 16K / 32K measured before and after.
#
#   01 pack the built-in corpus (Python standard-library repositories + KJV books) into 32K rows, boundaries kept
#   02 YaRN x4 relative to SmolLM2's original 8192 tokens (its config says rope_theta 1e5, 8192 positions)
#   03 continued pretraining at 32K, document-masked, one GPU
#   05 base and extended model side by side: RULER niah_single_2 at 8K / 16K / 32K, loss by position at 32K, MMLU
#
#   DRY_RUN=1 bash recipes/smollm2_32k.sh                  # the plan and the commands, nothing runs
#   bash recipes/smollm2_32k.sh                            # one GPU (an H100/H200 or a 24 GB card)
#   MODEL=path/to/SmolLM2-135M-Instruct bash recipes/smollm2_32k.sh   # a local copy instead of the hub name
#   MODEL=tiny/model ORIGINAL=64 STEPS=1 ROWS_PER_STEP=1 ... bash recipes/smollm2_32k.sh   # a CPU smoke, tiny sizes
#
# Nothing here is a published recipe [R]: the learning rate, step count and batch are longctx's choices for a
# 135M model, sized so that one H100 finishes 03 in about 20 minutes (derived: ~5.6 GFLOP per token at 32K with
# recomputation, at ~250 TFLOP/s). What the published recipes fix and this file follows: YaRN's factor relative to
# the ORIGINAL pretraining length (docs/recipes.md#ultralong-recipe), document masking for packed rows
# (docs/recipes.md#prolong-final-recipe), and evaluating the base beyond its window to show the failure.
: "${GPUS_PER_NODE:=1}"            # one GPU: the point of this recipe
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- model ----------------------------------------------------------------------------------------------------
: "${MODEL:=HuggingFaceTB/SmolLM2-135M-Instruct}"
: "${RUN:=runs/smollm2-32k}"
: "${ORIGINAL:=8192}"         # SmolLM2's pretraining window (max_position_embeddings 8192)
: "${FACTOR:=4}"              # YaRN x4: 8K -> 32K
: "${SEQ_LEN:=$((ORIGINAL * FACTOR))}"
: "${BETA_FAST:=32}"          # YaRN's defaults (the paper's alpha 1, beta 32)
: "${BETA_SLOW:=1}"

# --- data: the built-in corpus, so the recipe runs with no download beyond the model ------------------------------
: "${BOUNDARY:=mask}"         # document masking (ProLong's choice for packed rows)
: "${PACKING:=best-fit}"      # whole documents where they fit; long repositories and books split into row pieces
: "${DATA_EXTRA:=}"           # more 01 flags, e.g. "--max-docs 8" for a quick trial

# --- optimisation [R] -----------------------------------------------------------------------------------------
: "${ROWS_PER_STEP:=8}"       # 8 x 32K = 256K tokens per step
: "${STEPS:=200}"             # 52M tokens
: "${LR:=1e-4}"               # peak; small models take larger rates than ProLong's 1e-5 for 8B
: "${MIN_LR_RATIO:=0.1}"
: "${WARMUP_RATIO:=0.1}"
: "${SEED:=0}"
: "${SAVE_EVERY:=50}"
BATCH_TOKENS=$((ROWS_PER_STEP * SEQ_LEN))
TOTAL_TOKENS=$((BATCH_TOKENS * STEPS))

# --- evaluation -----------------------------------------------------------------------------------------------
: "${EVAL_LENGTHS:=$ORIGINAL,$((ORIGINAL * 2)),$SEQ_LEN}"
: "${EVAL_SAMPLES:=4}"
: "${DEPTHS:=0:100:5}"
: "${MMLU_LIMIT:=500}"
: "${EVAL_EXTRA:=}"           # more 05 flags, e.g. "--tasks niah,ppl" offline without MMLU data

echo "SmolLM2 32K: $MODEL -> $RUN (DRY_RUN=$DRY_RUN, $NGPUS GPU(s))"
plan --title "03 continued pretraining, SmolLM2-135M to 32K (one GPU)" --seq-len "$SEQ_LEN" \
  --batch-tokens "$BATCH_TOKENS" --steps "$STEPS" --cp 1 --shape smollm2-135m --layers 30 --hidden 576 \
  --params 1.35e8

# 01: the built-in corpus tokenized with SmolLM2's tokenizer, exactly the tokens 03 reads.
step "$RUN/data/manifest.json" \
  "$PY" 01_prepare_data.py --model "$MODEL" --seq-len "$SEQ_LEN" --boundary "$BOUNDARY" --packing "$PACKING" \
  --max-tokens "$TOTAL_TOKENS" --seed "$SEED" $DATA_EXTRA --out "$RUN/data"

# 02: YaRN x4 relative to the original 8K; both config forms; frequencies proven against transformers.
step "$RUN/model-yarn/manifest.json" \
  "$PY" 02_rope_scale.py --model "$MODEL" --method yarn --factor "$FACTOR" --original-len "$ORIGINAL" \
  --beta-fast "$BETA_FAST" --beta-slow "$BETA_SLOW" --out "$RUN/model-yarn"

# 03: one GPU (FSDP2 over one rank: the same code as on a cluster), document-masked varlen attention.
step "$RUN/cpt/final/manifest.json" \
  $LAUNCH 03_continued_pretrain.py --model "$RUN/model-yarn" --data "$RUN/data" --out "$RUN/cpt" --doc-mask \
  --batch-tokens "$BATCH_TOKENS" --max-steps "$STEPS" --lr "$LR" --min-lr-ratio "$MIN_LR_RATIO" \
  --warmup-ratio "$WARMUP_RATIO" --seed "$SEED" --save-every "$SAVE_EVERY" --resume auto

# 05: the base (beyond its 8K window, to show it failing), the patched-only model and the trained one.
step "$RUN/eval/manifest.json" \
  "$PY" 05_eval.py --models "$MODEL" "$RUN/model-yarn" "$RUN/cpt/final" --seq-len "$SEQ_LEN" \
  --lengths "$EVAL_LENGTHS" --depths "$DEPTHS" --samples "$EVAL_SAMPLES" --limit "$MMLU_LIMIT" \
  --allow-beyond-context $EVAL_EXTRA --out "$RUN/eval"
