#!/usr/bin/env bash
# ProLong SFT: short instruction tuning of the 512K model, the last step to ProLong-8B-512K-Instruct
# (arXiv 2410.02660; princeton-nlp/ProLong train_sft.sh). Facts: docs/recipes.md#prolong-final-recipe,
# #prolong-results. Run recipes/prolong_512k.sh first (or point MODEL at any extended model).
#
#   04 SFT on UltraChat, conversations packed into 64K rows with a mask per conversation, loss on assistant
#   tokens only, global token mean -> 05 evaluation of base, 512K model and the SFT model side by side.
#
#   DRY_RUN=1 bash recipes/prolong_sft.sh
#
# Why short data only: ProLong's ablation (T8) found any share of synthetic long SFT data worse than none
# (0%: 55.7; 1%: 54.1; 10%: 53.9; 50%: 43.3), and UltraChat beat Tulu-v2 and ShareGPT (T22: 55.7 / 49.1 / 45.2).
# Deviations: ProLong's SFT data is its own UltraChat release (prolong-ultrachat-64K, 1B tokens, pre-tokenized
# MDS, which 04 does not read); the default here is HuggingFaceH4/ultrachat_200k (UltraChat filtered, `messages`
# records), which is smaller, so the 250 steps repeat it. ProLong truncates the last conversation of each 64K row
# and discards the rest; 04 packs whole conversations (best-fit, rows padded) and drops any longer than a row.
# ProLong's --token_scaled_loss approximates the global token mean that 04 computes exactly.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- model --------------------------------------------------------------------------------------------------
: "${MODEL:=runs/prolong-512k/cpt/final}"           # the 512K model (train_sft.sh starts from ProLong-512K-Base)
: "${BASE_MODEL:=meta-llama/Meta-Llama-3-8B-Instruct}"  # evaluated beside it
: "${RUN:=runs/prolong-sft}"
: "${SEQ_LEN:=65536}"                               # conversations packed into 64K rows (Table 9)

# --- data ---------------------------------------------------------------------------------------------------
: "${SFT_DATA:=hf:HuggingFaceH4/ultrachat_200k::train_sft}"  # UltraChat (T22); see the deviation above
: "${MAX_CONV_TOKENS:=$SEQ_LEN}"                    # a conversation longer than a row is dropped and counted

# --- optimisation (Table 9 and train_sft.sh agree) ------------------------------------------------------------
: "${BATCH_TOKENS:=4194304}"  # bsz 64 x 64K = 4M tokens per step
: "${STEPS:=250}"             # 250 x 4M = 1.05B tokens ("1B")
: "${LR:=2e-5}"               # peak
: "${MIN_LR_RATIO:=0.1}"      # cosine to 2e-6
: "${WARMUP_RATIO:=0.05}"     # 5% warmup
: "${WEIGHT_DECAY:=0.1}"      # AdamW as in pretraining
: "${BETA1:=0.9}"
: "${BETA2:=0.95}"
: "${GRAD_CLIP:=1.0}"
: "${SEED:=0}"
: "${SAVE_EVERY:=50}"         # longctx choice

# --- evaluation (ProLong evaluates after SFT: RAG and re-rank gains only show then, Fig. 2) ---------------------
: "${EVAL_LEN:=131072}"       # 05 runs one model on one GPU; past ~128K an 8B's KV cache (128 KiB/token) fills it
: "${EVAL_SAMPLES:=4}"
: "${NIAH_TASKS:=ruler}"      # all 8 RULER NIAH variants
: "${DEPTHS:=0:100:11}"
: "${MMLU_DATA:=cais/mmlu}"   # 5-shot from the dev split, as lm-eval
: "${EVAL_EXTRA:=}"           # more 05 flags, e.g. "--limit 500"
: "${LM_EVAL_TASKS:=}"        # e.g. hellaswag,arc_challenge,winogrande,gsm8k (needs lm-eval)

echo "ProLong SFT: $MODEL -> $RUN (DRY_RUN=$DRY_RUN, $NGPUS GPUs)"
plan --stage 04 --title "04 SFT, ProLong UltraChat at 64K" --seq-len "$SEQ_LEN" --batch-tokens "$BATCH_TOKENS" \
  --steps "$STEPS" --shape llama-3.1-8b --layers 32 --hidden 4096 \
  --heads 32 --kv-heads 8 --head-dim 128 --ffn 14336 --vocab 128256 --params 8.03e9

step "$RUN/sft/final/manifest.json" \
  $LAUNCH 04_sft.py --model "$MODEL" --data "$SFT_DATA" --max-tokens "$MAX_CONV_TOKENS" --seq-len "$SEQ_LEN" \
  --batch-tokens "$BATCH_TOKENS" --max-steps "$STEPS" --lr "$LR" --min-lr-ratio "$MIN_LR_RATIO" \
  --warmup-ratio "$WARMUP_RATIO" --weight-decay "$WEIGHT_DECAY" --betas "$BETA1" "$BETA2" \
  --grad-clip "$GRAD_CLIP" --seed "$SEED" --save-every "$SAVE_EVERY" --out "$RUN/sft" --resume auto

step "$RUN/eval/manifest.json" \
  "$PY" 05_eval.py --models "$BASE_MODEL" "$MODEL" "$RUN/sft/final" --seq-len "$EVAL_LEN" \
  --niah-tasks "$NIAH_TASKS" --depths "$DEPTHS" --samples "$EVAL_SAMPLES" --mmlu-data "$MMLU_DATA" \
  --allow-beyond-context ${LM_EVAL_TASKS:+--lm-eval-tasks "$LM_EVAL_TASKS"} $EVAL_EXTRA --out "$RUN/eval"
