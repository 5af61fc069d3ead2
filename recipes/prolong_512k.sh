#!/usr/bin/env bash
# ProLong stage 2: the 64K model to 512K (arXiv 2410.02660; princeton-nlp/ProLong train_512K.sh). Facts:
# docs/recipes.md#prolong, docs/training.md#prolong-system-facts. Run recipes/prolong_64k.sh first.
#
#   01 mix and pack 512K rows -> 02 RoPE base 8e6 -> 1.28e8 -> 03 continued pretraining, 20B tokens, starting
#   from the 64K run's last checkpoint WITH its optimizer state and a fresh schedule (paper §3; ProLong does this
#   by renaming trainer_state.json and symlinking optimizer.pt, here it is --init-from ... --keep-optimizer)
#   -> 05 evaluation. Next: prolong_sft.sh.
#
#   DRY_RUN=1 bash recipes/prolong_512k.sh
#   PROLONG_DATA=data/prolong-data-512K bash recipes/prolong_512k.sh   # on ProLong's released 512K rows
#
# Sources disagree on the learning rate: the paper (Table 9) says 1e-5 "each stage", the released train_512K.sh
# uses 5e-6, and which one produced the released checkpoint is not known (docs/recipes.md#open-disagreements).
# This file uses the released script's 5e-6; LR=1e-5 gives the paper's.
#
# Hardware: ProLong ran this stage with Ulysses sequence parallelism over each 8-GPU node (--seq_parallel_size 8);
# here that is 03's --cp 8 (Ulysses all-to-all for document-masked rows, ProLong's local shortcut where no document
# straddles a slice), so each GPU holds 64K tokens of a 512K row, as in ProLong.
# Data as in prolong_64k.sh: raw sources with per-source length filters (512K-class documents >= 512K tokens,
# 64K-class ones 64K to 512K - 1, kept disjoint as in the paper), or ProLong's released rows (PROLONG_DATA);
# DATA_SHARDS=N prepares them as N shards. Deviation on raw sources: ProLong's 64K-class sources in this stage
# are 64K single-document pieces packed 8 to a row; 01 keeps a document whole (up to the row length), so
# "code-64k" and "books-64k" segments can be longer than 64K. The released rows have ProLong's own pieces.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- model --------------------------------------------------------------------------------------------------
: "${PREV_RUN:=runs/prolong-64k}"   # prolong_64k.sh's RUN
: "${PREV_STEPS:=5000}"             # its STEPS: the checkpoint to continue from
: "${MODEL:=$PREV_RUN/cpt/final}"   # the 64K model; 02 re-bases its RoPE (03 then loads the checkpoint's weights)
: "${BASE_MODEL:=meta-llama/Meta-Llama-3-8B-Instruct}"  # evaluated beside it
: "${RUN:=runs/prolong-512k}"
: "${SEQ_LEN:=524288}"              # 2^19 (Table 9)
: "${ROPE_THETA:=1.28e8}"           # 8e6 -> 1.28e8 (Table 9; T19: 57.7 vs 57.6 at the NTK-suggested 6.4e7)

# --- data: train_512K.sh's mix; code and books split between 512K documents and 64K-class documents ----------
: "${DATA_ROOT:=data/prolong}"
: "${PROLONG_DATA:=}"          # set: ProLong's released prolong-data-512K instead (folder names of train_512K.sh)
if [[ -n $PROLONG_DATA ]]; then
  P=$PROLONG_DATA
  : "${DATA_MIX:=code-512k=mds:$P/thestackv1_concat_by_repo-524288@0.15 \
code-64k=mds:$P/thestackv1_concat_by_repo-65536@0.15 books-512k=mds:$P/book-524288@0.05 \
books-64k=mds:$P/book-65536@0.25 textbooks=mds:$P/textbooks@0.03 fineweb-edu=mds:$P/fineweb-edu@0.10 \
fineweb=mds:$P/fineweb-2023-50@0.10 stackexchange=mds:$P/stackexchange@0.04 wikipedia=mds:$P/dolmawiki@0.04 \
tulu-v2=mds:$P/tuluv2@0.03 arxiv=mds:$P/arxiv@0.03 openwebmath=mds:$P/openwebmath@0.03}"
fi
: "${DATA_MIX:=code-512k=repo:$DATA_ROOT/thestack-repos@0.15:min=524288 \
code-64k=repo:$DATA_ROOT/thestack-repos@0.15:min=65536,max=524287 books-512k=$DATA_ROOT/books@0.05:min=524288 \
books-64k=$DATA_ROOT/books@0.25:min=65536,max=524287 textbooks=$DATA_ROOT/textbooks@0.03 \
fineweb-edu=$DATA_ROOT/fineweb-edu@0.10 fineweb=$DATA_ROOT/fineweb-2023-50@0.10 \
stackexchange=$DATA_ROOT/stackexchange@0.04 wikipedia=$DATA_ROOT/dolmawiki@0.04 tulu-v2=$DATA_ROOT/tuluv2@0.03 \
arxiv=$DATA_ROOT/arxiv@0.03 openwebmath=$DATA_ROOT/openwebmath@0.03}"
: "${DATA_SHARDS:=1}"         # prepare the data as this many shards (one per machine)
: "${BOUNDARY:=mask}"
: "${PACKING:=concat}"

# --- optimisation -------------------------------------------------------------------------------------------
: "${BATCH_TOKENS:=8388608}"  # bsz 128 x 512K / 8 (SP) = 8M tokens per step = 16 rows (train_512K.sh)
: "${STEPS:=2500}"            # 2500 x 8M = 21.0B tokens ("20B", Table 9)
: "${LR:=5e-6}"               # conflict: train_512K.sh 5e-6 (used here) vs paper Table 9 1e-5
: "${MIN_LR_RATIO:=0.1}"      # cosine to 0.1 x peak
: "${WARMUP_RATIO:=0.1}"      # the schedule restarts: warmup again (LR schedule reset, paper §3)
: "${WEIGHT_DECAY:=0.1}"
: "${BETA1:=0.9}"
: "${BETA2:=0.95}"
: "${GRAD_CLIP:=1.0}"
: "${SEED:=0}"
: "${SAVE_EVERY:=100}"        # longctx choice: 512K steps are long
: "${CP:=8}"                  # --seq_parallel_size 8 (train_512K.sh): each 512K row split over 8 GPUs

# --- evaluation ---------------------------------------------------------------------------------------------
: "${EVAL_LEN:=131072}"       # 05 runs one model on one GPU; past ~128K an 8B's KV cache (128 KiB/token) fills it
: "${EVAL_SAMPLES:=4}"
: "${NIAH_TASKS:=ruler}"      # all 8 RULER NIAH variants
: "${DEPTHS:=0:100:11}"
: "${MMLU_DATA:=cais/mmlu}"   # 5-shot from the dev split, as lm-eval
: "${EVAL_EXTRA:=}"           # more 05 flags, e.g. "--limit 500"

echo "ProLong 512K: $MODEL -> $RUN (DRY_RUN=$DRY_RUN, $NGPUS GPUs)"
plan --title "03 continued pretraining, ProLong 512K" --seq-len "$SEQ_LEN" --batch-tokens "$BATCH_TOKENS" \
  --steps "$STEPS" --cp "$CP" --shape llama-3.1-8b --layers 32 --hidden 4096 \
  --heads 32 --kv-heads 8 --head-dim 128 --ffn 14336 --vocab 128256 --params 8.03e9 \
  --published-hours 12200 --published-tokens 20e9 --published-source "ProLong Table 9: 20B tokens at 512K, H100"

read -r -a MIX <<< "$DATA_MIX"
prepare_shards "$RUN/data" "$DATA_SHARDS" \
  "$PY" 01_prepare_data.py --data "${MIX[@]}" --tokenizer "$MODEL" --seq-len "$SEQ_LEN" \
  --boundary "$BOUNDARY" --packing "$PACKING" --max-tokens "$((BATCH_TOKENS * STEPS))" --seed "$SEED"

step "$RUN/model-theta/manifest.json" \
  "$PY" 02_rope_scale.py --model "$MODEL" --method theta --theta "$ROPE_THETA" --target-len "$SEQ_LEN" \
  --out "$RUN/model-theta"

# 03: config from 02 (new base), weights AND AdamW moments from the 64K run's last step; step, schedule and data
# position start afresh. --resume auto: a preempted run continues from its own last checkpoint in $RUN/cpt
# (the 64K checkpoint is then not read again).
step "$RUN/cpt/final/manifest.json" \
  $LAUNCH 03_continued_pretrain.py --model "$RUN/model-theta" \
  --init-from "$(last_checkpoint "$PREV_RUN/cpt" "$PREV_STEPS")" --keep-optimizer \
  --data "$RUN/data" --out "$RUN/cpt" --doc-mask --cp "$CP" --batch-tokens "$BATCH_TOKENS" --max-steps "$STEPS" \
  --lr "$LR" --min-lr-ratio "$MIN_LR_RATIO" --warmup-ratio "$WARMUP_RATIO" --weight-decay "$WEIGHT_DECAY" \
  --betas "$BETA1" "$BETA2" --grad-clip "$GRAD_CLIP" --seed "$SEED" --save-every "$SAVE_EVERY" --final-checkpoint \
  --resume auto

step "$RUN/eval/manifest.json" \
  "$PY" 05_eval.py --models "$BASE_MODEL" "$MODEL" "$RUN/cpt/final" --seq-len "$EVAL_LEN" \
  --niah-tasks "$NIAH_TASKS" --depths "$DEPTHS" --samples "$EVAL_SAMPLES" --mmlu-data "$MMLU_DATA" \
  --allow-beyond-context $EVAL_EXTRA --out "$RUN/eval"
