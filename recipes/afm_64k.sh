#!/usr/bin/env bash
# Arcee AFM-4.5B: 4K to 64K with YaRN, continued pretraining, model soups and short-context distillation
# (Charles Goddard, "Extending AFM-4.5B to 64k Context Length", Arcee blog, 2025-06-23).
# Facts: docs/recipes.md#arcee-afm-45b, #arcee-results. The public blog text stops after its PoSE experiment,
# so most of this file is a RECONSTRUCTION:
#   [C] confirmed: the YaRN settings (AFM's shipped config), the 4K starting length, the steps named by Arcee's
#       GLM-4-32B-Base-32K card (long continued pretraining, iterative merging, short-context distillation),
#       DistillKit's loss defaults, and the published numbers below;
#   [S] secondary (a third-party note citing the blog): ProLong data, MergeKit + DistillKit, ~700 H100-hours,
#       NIAH 100% at 32K and 97% at 64K;
#   [R] reconstructed here, not published: every data amount, learning rate, step count, run count, soup weight
#       and the distillation data (docs/recipes.md#arcee-reconstruction).
#
#   01 ProLong-style 64K rows + 4K short rows -> 02 YaRN factor 20 -> 03 x RUNS long runs -> 06 soup of the runs
#   -> 04 distillation from the original 4K model on short text -> 06 soup of distilled + soup -> 05 evaluation of
#   every step (Arcee's proxies: MMLU and BBH for short, NIAH / RULER for long; pick by the short/long trade-off).
#
#   DRY_RUN=1 bash recipes/afm_64k.sh
#
# Published numbers to compare with [C blog]: annealed 4K model MMLU 65.4 / BBH 43.5; YaRN alone, no training,
# MMLU 55.0 / BBH 36.0; final 64K model NIAH 100% at 32K, 97% at 64K [S].
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- model --------------------------------------------------------------------------------------------------
# Arcee started from its annealed 4K checkpoint, which is not public; the released AFM-4.5B-Base already carries
# the 64K YaRN config (02 re-patches it from original_max_position_embeddings 4096, and as the teacher it keeps
# that config). For a faithful run set MODEL to a 4K model with its original RoPE.
: "${MODEL:=arcee-ai/AFM-4.5B-Base}"
: "${TEACHER:=$MODEL}"               # the original short model, original RoPE [C GLM-4-32B-Base-32K card]
: "${RUN:=runs/afm-64k}"
: "${SEQ_LEN:=65536}"                # 64K target [C]
: "${ORIGINAL_LEN:=4096}"            # pretraining context, "a sweet spot for a tasty MFU" [C blog]
: "${YARN_FACTOR:=20}"               # [C shipped config]: 20, not 64K/4K = 16 (why is not published)
: "${BETA_FAST:=32}"                 # [C shipped config]
: "${BETA_SLOW:=1}"                  # [C shipped config]
: "${MSCALE:=1.0}"                   # [C shipped config]: attention factor 0.1 ln 20 + 1 = 1.30 on cos and sin

# --- data [S: ProLong data; the mix, lengths and amounts are R] -----------------------------------------------
: "${DATA_ROOT:=data/prolong}"
: "${DATA_MIX:=code=repo:$DATA_ROOT/thestack-repos@0.30 books=$DATA_ROOT/books@0.30 \
fineweb-edu=$DATA_ROOT/fineweb-edu@0.10 fineweb=$DATA_ROOT/fineweb-2023-50@0.10 \
stackexchange=$DATA_ROOT/stackexchange@0.04 wikipedia=$DATA_ROOT/dolmawiki@0.04 tulu-v2=$DATA_ROOT/tuluv2@0.03 \
arxiv=$DATA_ROOT/arxiv@0.03 openwebmath=$DATA_ROOT/openwebmath@0.03 textbooks=$DATA_ROOT/textbooks@0.03}"
: "${SHORT_MIX:=fineweb-edu=$DATA_ROOT/fineweb-edu@0.5 fineweb=$DATA_ROOT/fineweb-2023-50@0.5}"  # [R]
: "${BOUNDARY:=mask}"                # [R] Arcee's masking is unknown; ProLong's data came with document masks

# --- long continued pretraining, RUNS independent runs (different data orders) [R] ---------------------------
: "${RUNS:=2}"                       # [R] "checkpoints from different training runs" [C card], count unknown
: "${BATCH_TOKENS:=4194304}"         # [R] ProLong's 4M tokens per step
: "${STEPS:=500}"                    # [R] 500 x 4M = 2.1B tokens per run
: "${LR:=1e-5}"                      # [R] ProLong's 64K value
: "${MIN_LR_RATIO:=0.1}"             # [R]
: "${WARMUP_RATIO:=0.1}"             # [R]
: "${WEIGHT_DECAY:=0.1}"             # [R]
: "${BETA1:=0.9}"                    # [R]
: "${BETA2:=0.95}"                   # [R]
: "${GRAD_CLIP:=1.0}"                # [R]
: "${SAVE_EVERY:=100}"               # longctx choice
: "${CP:=1}"                         # 64K rows of a 4.5B model fit one GPU (plan: memory floor)

# --- distillation on short text (DistillKit's logit KD) -------------------------------------------------------
: "${SHORT_LEN:=$ORIGINAL_LEN}"      # [R] the teacher's own window
: "${DISTILL_BATCH_TOKENS:=1048576}"  # [R] 256 rows of 4K
: "${DISTILL_STEPS:=500}"            # [R] 0.5B tokens
: "${DISTILL_LR:=1e-5}"              # [R]
: "${ALPHA:=0.5}"                    # [C DistillKit default] weight of T^2 KL against (1 - alpha) CE
: "${TEMPERATURE:=2.0}"              # [C DistillKit default]
: "${FINAL_WEIGHTS:=1 1}"            # [R] final soup: distilled model, soup of the long runs

# --- evaluation ---------------------------------------------------------------------------------------------
: "${EVAL_LEN:=$SEQ_LEN}"
: "${EVAL_SAMPLES:=4}"
: "${NIAH_TASKS:=ruler}"      # all 8 RULER NIAH variants
: "${DEPTHS:=0:100:11}"
: "${MMLU_DATA:=cais/mmlu}"   # 5-shot from the dev split, as lm-eval
: "${EVAL_EXTRA:=}"           # more 05 flags, e.g. "--limit 500"
: "${LM_EVAL_TASKS:=}"        # bbh: Arcee's second short proxy (needs lm-eval)

echo "AFM 64K (reconstruction): $MODEL -> $RUN (DRY_RUN=$DRY_RUN, $NGPUS GPUs)"
plan --title "03 continued pretraining, AFM 64K [R]" --seq-len "$SEQ_LEN" --batch-tokens "$BATCH_TOKENS" \
  --steps "$STEPS" --runs "$RUNS" --cp "$CP" --shape afm-4.5b --layers 36 --hidden 2560 --params 4.62e9 \
  --published-hours 700 --published-source "whole recipe, H100 [S]"
plan --stage 04 --title "04 distillation on ${SHORT_LEN}-token text [R]" --seq-len "$SHORT_LEN" \
  --batch-tokens "$DISTILL_BATCH_TOKENS" --steps "$DISTILL_STEPS" --shape afm-4.5b --layers 36 --hidden 2560 \
  --params 4.62e9

read -r -a MIX <<< "$DATA_MIX"
step "$RUN/data/manifest.json" \
  "$PY" 01_prepare_data.py --data "${MIX[@]}" --tokenizer "$MODEL" --seq-len "$SEQ_LEN" --boundary "$BOUNDARY" \
  --packing concat --max-tokens "$((BATCH_TOKENS * STEPS))" --seed 0 --out "$RUN/data"
read -r -a SHORT <<< "$SHORT_MIX"
step "$RUN/data-short/manifest.json" \
  "$PY" 01_prepare_data.py --data "${SHORT[@]}" --tokenizer "$MODEL" --seq-len "$SHORT_LEN" --boundary mask \
  --packing concat --max-tokens "$((DISTILL_BATCH_TOKENS * DISTILL_STEPS))" --seed 0 --out "$RUN/data-short"

# 02: AFM's shipped rope: yarn, factor 20 from 4096, beta 32/1, mscale 1, max_position_embeddings 65536.
step "$RUN/model-yarn/manifest.json" \
  "$PY" 02_rope_scale.py --model "$MODEL" --method yarn --factor "$YARN_FACTOR" --target-len "$SEQ_LEN" \
  --original-len "$ORIGINAL_LEN" --beta-fast "$BETA_FAST" --beta-slow "$BETA_SLOW" --mscale "$MSCALE" \
  --out "$RUN/model-yarn"

# 03, RUNS times: same data, a different seed (data order), each its own run directory.
ingredients=()
for ((r = 0; r < RUNS; r++)); do
  step "$RUN/cpt-$r/final/manifest.json" \
    $LAUNCH 03_continued_pretrain.py --model "$RUN/model-yarn" --data "$RUN/data" --out "$RUN/cpt-$r" \
    --doc-mask --cp "$CP" --batch-tokens "$BATCH_TOKENS" --max-steps "$STEPS" --lr "$LR" \
    --min-lr-ratio "$MIN_LR_RATIO" --warmup-ratio "$WARMUP_RATIO" --weight-decay "$WEIGHT_DECAY" \
    --betas "$BETA1" "$BETA2" --grad-clip "$GRAD_CLIP" --seed "$r" --save-every "$SAVE_EVERY" --resume auto
  ingredients+=("$RUN/cpt-$r/final")
done

# 06: equal-weight linear soup of the long runs (mergekit `linear`, normalised); the rope config of the first.
step "$RUN/soup/manifest.json" \
  "$PY" 06_merge.py --models "${ingredients[@]}" --out "$RUN/soup"

# 04: restoration distillation: student = soup (YaRN), teacher = original model (its own RoPE), short text.
step "$RUN/distill/final/manifest.json" \
  $LAUNCH 04_sft.py --model "$RUN/soup" --teacher "$TEACHER" --data "$RUN/data-short" --alpha "$ALPHA" \
  --temperature "$TEMPERATURE" --batch-tokens "$DISTILL_BATCH_TOKENS" --max-steps "$DISTILL_STEPS" \
  --lr "$DISTILL_LR" --seed 0 --out "$RUN/distill" --resume auto

# 06 again ("iterative merging"): the distilled model with the soup it came from.
read -r -a WEIGHTS <<< "$FINAL_WEIGHTS"
step "$RUN/final/manifest.json" \
  "$PY" 06_merge.py --models "$RUN/distill/final" "$RUN/soup" --weights "${WEIGHTS[@]}" --out "$RUN/final"

# 05: every step side by side, the first (the original model) as the baseline of the deltas.
step "$RUN/eval/manifest.json" \
  "$PY" 05_eval.py --models "$MODEL" "$RUN/model-yarn" "$RUN/soup" "$RUN/distill/final" "$RUN/final" \
  --seq-len "$EVAL_LEN" --niah-tasks "$NIAH_TASKS" --depths "$DEPTHS" --samples "$EVAL_SAMPLES" \
  --mmlu-data "$MMLU_DATA" --allow-beyond-context ${LM_EVAL_TASKS:+--lm-eval-tasks "$LM_EVAL_TASKS"} $EVAL_EXTRA \
  --out "$RUN/eval"
