#!/usr/bin/env bash
# NVIDIA UltraLong: Llama-3.1-8B-Instruct (128K) to 1M, 2M or 4M tokens in one step (Xu et al., "From 128K to 4M:
# Efficient Training of Ultra-Long Context Large Language Models", arXiv 2504.06214). No training code was
# released: the settings come from the paper, project page and model cards.
# Facts: docs/recipes.md#ultralong, #ultralong-results.
#
#   01 SlimPajama per domain, short documents downsampled and long ones upsampled, "<s>" between documents
#   -> 02 YaRN, s = target / 8192 (Llama-3.1's ORIGINAL length), beta_fast 4, beta_slow 1 -> 03 continued
#   pretraining, 1B tokens, full attention over each packed row (no document mask) -> 04 short SFT (< 8K tokens,
#   a few hundred steps) -> 05 evaluation.
#
#   TARGET=1m DRY_RUN=1 bash recipes/ultralong.sh     # TARGET = 1m (default), 2m or 4m
#
# Tags: [C] confirmed in a primary source, [S] secondary (quoted excerpt), [R] reconstructed here (not published).
# Hardware: UltraLong trained with context and tensor parallelism (CP 4-16 x TP 8, 256 H100s per seed 001,
# unverified). 03 has context parallelism but no tensor parallelism: each row is split over CP GPUs (ring attention
# for these unmasked rows), CP chosen so checkpointed layer inputs stay at 32 GiB per GPU [R]. 2m and 4m need 2
# and 4 nodes: set NNODES and LAUNCH (a multi-node torchrun line).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${TARGET:=1m}"
case $TARGET in  # row length, CPT steps, SFT steps, GPUs per row
  1m) seq=1048576 cpt_steps=120 sft_steps=480 cp=8 ;;   # SFT 480 steps [C project page]
  2m) seq=2097152 cpt_steps=120 sft_steps=140 cp=16 ;;  # SFT 140 [C]
  4m) seq=4194304 cpt_steps=150 sft_steps=150 cp=32 ;;  # CPT 150 iterations x 2 x 4M [C 4M model card]; SFT 150 [C]
  *) echo "error: TARGET must be 1m, 2m or 4m (got '$TARGET')" >&2; exit 2 ;;
esac

# --- model --------------------------------------------------------------------------------------------------
: "${MODEL:=meta-llama/Llama-3.1-8B-Instruct}"  # [S] excerpt; base 5e5, llama3 scaling x8 from 8K [C config]
: "${RUN:=runs/ultralong-$TARGET}"
: "${SEQ_LEN:=$seq}"                            # trained at the target length, one step (Table 4: one step to 1M
                                                # beats 128K -> 512K -> 1M, RULER 80.17 vs 77.52)
: "${ORIGINAL_LEN:=8192}"                       # Llama-3.1's pretraining length: s = target / 8192 [S + arithmetic]
: "${YARN_FACTOR:=$((SEQ_LEN / ORIGINAL_LEN))}"  # 128 / 256 / 512
: "${BETA_FAST:=4}"                             # paper's beta = 4 -> HF beta_fast [S]
: "${BETA_SLOW:=1}"                             # paper's alpha = 1 -> HF beta_slow [S]

# --- data: SlimPajama by domain [S], at its natural shares (cerebras/SlimPajama-627B card) -------------------
# One folder per RedPajama set (meta.redpajama_set_name), each of jsonl/parquet files with a `text` field.
: "${DATA_ROOT:=data/slimpajama}"
: "${DATA_MIX:=commoncrawl=$DATA_ROOT/RedPajamaCommonCrawl@0.522 c4=$DATA_ROOT/RedPajamaC4@0.267 \
github=$DATA_ROOT/RedPajamaGithub@0.052 book=$DATA_ROOT/RedPajamaBook@0.042 arxiv=$DATA_ROOT/RedPajamaArXiv@0.046 \
wikipedia=$DATA_ROOT/RedPajamaWikipedia@0.038 stackexchange=$DATA_ROOT/RedPajamaStackExchange@0.033}"
: "${SEPARATOR:=<s>}"           # literal "<s>" between documents instead of BOS/EOS [S]; without it RULER<1M 79.15
                                # vs 80.17, InfiniteBench 22.75 vs 26.25 (Table 3)
: "${LONG_TOKEN_SHARE:=0.7}"    # per-source length upsampling, Fu et al. 2024 [C];
                                # the share ~70% [R, docs/data-format.md#length-upsampling]
: "${SHORT_DOC_TOKENS:=4096}"   # documents < 4K downsampled [S]
: "${LONG_DOC_TOKENS:=8192}"    # documents > 8K upsampled [S]

# --- continued pretraining ----------------------------------------------------------------------------------
: "${BATCH_TOKENS:=8388608}"    # 2 x 4M per step [C 4M card]; the same 8M tokens for 1M / 2M [R: not published]
: "${STEPS:=$cpt_steps}"        # 4M: 150 [C] (1.26B tokens); 1M / 2M: 120 x 8M = 1.0B, the paper's 1B [R]
: "${LR:=3e-5}"                 # [S] excerpt + seed 001
: "${MIN_LR_RATIO:=0.1}"        # [R] not published (longctx / ProLong default)
: "${WARMUP_RATIO:=0.1}"        # [R] not published (longctx / ProLong default)
: "${WEIGHT_DECAY:=0.1}"        # [R] not published
: "${BETA1:=0.9}"               # [R] "Adam" [S]; betas not published
: "${BETA2:=0.95}"
: "${GRAD_CLIP:=1.0}"           # [R]
: "${SEED:=0}"
: "${SAVE_EVERY:=25}"           # longctx choice
: "${CP:=$cp}"                  # 8 / 16 / 32 GPUs per row [R]: 32 layers x target/CP tokens x 4096 x 2 B = 32 GiB

# --- SFT: short conversations only [S] ----------------------------------------------------------------------
# UltraLong subsampled "general_sft_stage2" of nvidia/AceMath-Instruct-Training-Data [C 4M card] (responses
# refined with GPT-4o [S]); give it as `messages` records, e.g. the parquet converted to jsonl.
: "${SFT_DATA:=data/ultralong-sft.jsonl}"
: "${SFT_MAX_TOKENS:=8192}"     # examples under 8K tokens [S]
: "${SFT_BATCH_TOKENS:=1048576}"  # batch 128 [S]: 04 batches by tokens, 128 rows of 8K, each one or more whole
                                  # conversations, so a step sees at least 128 [R]
: "${SFT_STEPS:=$sft_steps}"    # 480 / 140 / 150 [C]
: "${SFT_LR:=5e-6}"             # [S]
: "${SFT_WARMUP_RATIO:=0.1}"    # [R] not published

# --- evaluation (UltraLong: RULER, LV-Eval, InfiniteBench, NIAH to the full length; MMLU and 4 more short) -----
: "${EVAL_LEN:=131072}"       # 05 runs one model on one GPU; past ~128K an 8B's KV cache (128 KiB/token) fills it
: "${EVAL_SAMPLES:=4}"
: "${NIAH_TASKS:=ruler}"      # all 8 RULER NIAH variants
: "${DEPTHS:=0:100:11}"
: "${MMLU_DATA:=cais/mmlu}"   # 5-shot from the dev split, as lm-eval
: "${EVAL_EXTRA:=}"           # more 05 flags, e.g. "--limit 500"
: "${LM_EVAL_TASKS:=}"        # e.g. mmlu_pro,gsm8k (needs lm-eval)

echo "UltraLong $TARGET: $MODEL -> $RUN (DRY_RUN=$DRY_RUN, $NGPUS GPUs)"
plan --title "03 continued pretraining, UltraLong $TARGET" --seq-len "$SEQ_LEN" --batch-tokens "$BATCH_TOKENS" \
  --steps "$STEPS" --cp "$CP" --shape llama-3.1-8b --layers 32 --hidden 4096 \
  --heads 32 --kv-heads 8 --head-dim 128 --ffn 14336 --vocab 128256 --params 8.03e9
plan --stage 04 --title "04 SFT, UltraLong $TARGET (conversations < 8K)" --seq-len "$SFT_MAX_TOKENS" \
  --batch-tokens "$SFT_BATCH_TOKENS" --steps "$SFT_STEPS" --shape llama-3.1-8b --layers 32 --hidden 4096 \
  --heads 32 --kv-heads 8 --head-dim 128 --ffn 14336 --vocab 128256 \
  --params 8.03e9

read -r -a MIX <<< "$DATA_MIX"
step "$RUN/data/manifest.json" \
  "$PY" 01_prepare_data.py --data "${MIX[@]}" --tokenizer "$MODEL" --seq-len "$SEQ_LEN" --boundary separator \
  --separator "$SEPARATOR" --packing concat --long-token-share "$LONG_TOKEN_SHARE" \
  --short-doc-tokens "$SHORT_DOC_TOKENS" --long-doc-tokens "$LONG_DOC_TOKENS" \
  --max-tokens "$((BATCH_TOKENS * STEPS))" --seed "$SEED" --out "$RUN/data"

# 02: replaces Llama-3.1's llama3 scaling with YaRN, the factor relative to 8K, not 128K.
step "$RUN/model-yarn/manifest.json" \
  "$PY" 02_rope_scale.py --model "$MODEL" --method yarn --factor "$YARN_FACTOR" --target-len "$SEQ_LEN" \
  --original-len "$ORIGINAL_LEN" --beta-fast "$BETA_FAST" --beta-slow "$BETA_SLOW" --out "$RUN/model-yarn"

# 03: causal attention over each whole packed row (--no-doc-mask): tokens after "<s>" see the previous document;
# each row split over CP GPUs (ring attention).
step "$RUN/cpt/final/manifest.json" \
  $LAUNCH 03_continued_pretrain.py --model "$RUN/model-yarn" --data "$RUN/data" --out "$RUN/cpt" --no-doc-mask \
  --cp "$CP" --batch-tokens "$BATCH_TOKENS" --max-steps "$STEPS" --lr "$LR" --min-lr-ratio "$MIN_LR_RATIO" \
  --warmup-ratio "$WARMUP_RATIO" --weight-decay "$WEIGHT_DECAY" --betas "$BETA1" "$BETA2" \
  --grad-clip "$GRAD_CLIP" --seed "$SEED" --save-every "$SAVE_EVERY" --resume auto

step "$RUN/sft/final/manifest.json" \
  $LAUNCH 04_sft.py --model "$RUN/cpt/final" --data "$SFT_DATA" --max-tokens "$SFT_MAX_TOKENS" \
  --seq-len "$SFT_MAX_TOKENS" --batch-tokens "$SFT_BATCH_TOKENS" --max-steps "$SFT_STEPS" --lr "$SFT_LR" \
  --warmup-ratio "$SFT_WARMUP_RATIO" --seed "$SEED" --out "$RUN/sft" --resume auto

step "$RUN/eval/manifest.json" \
  "$PY" 05_eval.py --models "$MODEL" "$RUN/cpt/final" "$RUN/sft/final" --seq-len "$EVAL_LEN" \
  --niah-tasks "$NIAH_TASKS" --depths "$DEPTHS" --samples "$EVAL_SAMPLES" --mmlu-data "$MMLU_DATA" \
  ${LM_EVAL_TASKS:+--lm-eval-tasks "$LM_EVAL_TASKS"} $EVAL_EXTRA --out "$RUN/eval"
