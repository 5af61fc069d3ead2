#!/usr/bin/env bash
# ProLong stage 1: Llama-3-8B-Instruct from 8K to 64K (Gao et al., "How to Train Long-Context Language Models
# (Effectively)", arXiv 2410.02660; princeton-nlp/ProLong train_64K.sh).
# Facts: docs/recipes.md#prolong, docs/training.md#prolong-system-facts.
#
#   01 mix and pack 64K rows (document boundaries kept) -> 02 RoPE base 5e5 -> 8e6 -> 03 continued pretraining,
#   20B tokens, document masking -> 05 evaluation against the base. Next: prolong_512k.sh, then prolong_sft.sh
#   (ProLong selects checkpoints only after SFT: RAG and re-rank gains appear after it, paper Fig. 2).
#
#   DRY_RUN=1 bash recipes/prolong_64k.sh      # the plan and the commands, nothing runs
#   bash recipes/prolong_64k.sh                # on one node of 8 GPUs (80 GB each, ProLong README)
#   LR=2e-5 STEPS=100 RUN=runs/try bash recipes/prolong_64k.sh   # any variable below can be overridden
#   PROLONG_DATA=data/prolong-data-64K bash recipes/prolong_64k.sh   # on ProLong's released rows (below)
#
# Data, two ways: your raw sources (DATA_ROOT, tokenized and packed by 01; the long sources keep only documents
# of >= 64K tokens, App. A.2, through per-source filters `@share:min=65536`), or ProLong's released packed data
# (PROLONG_DATA: a local copy of the hub dataset princeton-nlp/prolong-data-64K, its MDS domain folders mixed by
# the same shares, every row kept whole with its document spans). DATA_SHARDS=N prepares the data as N shards
# (01 --num-shards; run the printed 01 commands on N machines side by side, or let the recipe run them in turn);
# 03 reads the folder of shards as one dataset and 01 --merge-report combines their statistics.
# Deviations from ProLong, stated so nobody mistakes this file for a bit-exact replay:
# - The loss is the exact global token mean (03); ProLong's default is a per-device mean.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- model --------------------------------------------------------------------------------------------------
: "${MODEL:=meta-llama/Meta-Llama-3-8B-Instruct}"  # train_64K.sh; Instruct init beats base (55.0 vs 54.6, T21)
: "${RUN:=runs/prolong-64k}"                       # everything this recipe writes goes under here
: "${SEQ_LEN:=65536}"                              # 2^16 (Table 9; per_device_max_tokens 65536)
: "${ROPE_THETA:=8e6}"                             # ABF base 5e5 -> 8e6 (Table 9, T18: 54.6 vs 48.7 at 4e6)

# --- data: 64K mix of train_64K.sh, name=[kind:]location@share[:min=N] (01's SPEC@WEIGHT) ---------------------
# long (60%): code repositories of The Stack v1 (one document per repository) and SlimPajama books, documents of
# >= 64K tokens only; short (37%, "ShortMix"): FineWeb-Edu, FineWeb (2023-50), StackExchange, Wikipedia (Dolma),
# Tulu-v2, ArXiv, OpenWebMath; textbooks (3%, libretexts; no length filter is published for them [I]). Shares:
# train_64K.sh, which matches paper v4 (the slides swap Tulu and Wikipedia).
: "${DATA_ROOT:=data/prolong}"
: "${PROLONG_DATA:=}"          # set: ProLong's released prolong-data-64K instead (folder names of train_64K.sh)
if [[ -n $PROLONG_DATA ]]; then
  P=$PROLONG_DATA
  : "${DATA_MIX:=code=mds:$P/thestackv1_concat_by_repo-65536@0.30 books=mds:$P/book-65536@0.30 \
fineweb-edu=mds:$P/fineweb-edu@0.10 fineweb=mds:$P/fineweb-2023-50@0.10 stackexchange=mds:$P/stackexchange@0.04 \
wikipedia=mds:$P/dolmawiki@0.04 tulu-v2=mds:$P/tuluv2@0.03 arxiv=mds:$P/arxiv@0.03 \
openwebmath=mds:$P/openwebmath@0.03 textbooks=mds:$P/textbooks@0.03}"
fi
: "${DATA_MIX:=code=repo:$DATA_ROOT/thestack-repos@0.30:min=65536 books=$DATA_ROOT/books@0.30:min=65536 \
fineweb-edu=$DATA_ROOT/fineweb-edu@0.10 fineweb=$DATA_ROOT/fineweb-2023-50@0.10 \
stackexchange=$DATA_ROOT/stackexchange@0.04 wikipedia=$DATA_ROOT/dolmawiki@0.04 tulu-v2=$DATA_ROOT/tuluv2@0.03 \
arxiv=$DATA_ROOT/arxiv@0.03 openwebmath=$DATA_ROOT/openwebmath@0.03 textbooks=$DATA_ROOT/textbooks@0.03}"
: "${DATA_SHARDS:=1}"         # prepare the data as this many shards (one per machine)
: "${BOUNDARY:=mask}"       # document masking, FA2 varlen in ProLong (T20: 54.6/65.5 vs 53.6/64.9 unmasked)
: "${PACKING:=concat}"      # short data: concatenate, cut, carry the remainder to the next row (App. A.2)

# --- optimisation (Table 9 and train_64K.sh agree) ------------------------------------------------------------
: "${BATCH_TOKENS:=4194304}"  # bsz 64 sequences x 65536 = 4M tokens per step
: "${STEPS:=5000}"            # 5000 x 4M = 21.0B tokens ("20B")
: "${LR:=1e-5}"               # peak
: "${MIN_LR_RATIO:=0.1}"      # cosine to 1e-6 (--min_lr_ratio 0.1)
: "${WARMUP_RATIO:=0.1}"      # 10% warmup
: "${WEIGHT_DECAY:=0.1}"      # AdamW
: "${BETA1:=0.9}"
: "${BETA2:=0.95}"
: "${GRAD_CLIP:=1.0}"         # max_grad_norm 1.0 (script only, not in the paper)
: "${SEED:=0}"
: "${SAVE_EVERY:=250}"        # longctx choice (ProLong's save interval is not published)
: "${CP:=1}"                  # no sequence parallelism at 64K (chunked CE makes it fit 80 GB, ProLong README)

# --- evaluation (05: RULER NIAH + MMLU + loss by position; ProLong itself used HELMET and lm-eval) -----------
: "${EVAL_LEN:=$SEQ_LEN}"
: "${EVAL_SAMPLES:=4}"
: "${NIAH_TASKS:=ruler}"      # all 8 RULER NIAH variants
: "${DEPTHS:=0:100:11}"
: "${MMLU_DATA:=cais/mmlu}"   # 5-shot from the dev split, as lm-eval
: "${EVAL_EXTRA:=}"           # more 05 flags, e.g. "--limit 500"
: "${LM_EVAL_TASKS:=}"        # e.g. hellaswag,arc_challenge,winogrande,gsm8k (ProLong's short suite; needs lm-eval)

echo "ProLong 64K: $MODEL -> $RUN (DRY_RUN=$DRY_RUN, $NGPUS GPUs)"
plan --title "03 continued pretraining, ProLong 64K" --seq-len "$SEQ_LEN" --batch-tokens "$BATCH_TOKENS" \
  --steps "$STEPS" --cp "$CP" --shape llama-3.1-8b --layers 32 --hidden 4096 \
  --heads 32 --kv-heads 8 --head-dim 128 --ffn 14336 --vocab 128256 --params 8.03e9 \
  --published-hours 2200 --published-tokens 20e9 --published-source "ProLong Table 9: 20B tokens at 64K, H100"

# 01: tokenize with the model's tokenizer, mix by token share, pack 64K rows; the budget (split over the shards)
# is exactly what 03 reads. $RUN/data holds the shards; the combined statistics go to $RUN/data-report.
read -r -a MIX <<< "$DATA_MIX"
prepare_shards "$RUN/data" "$DATA_SHARDS" \
  "$PY" 01_prepare_data.py --data "${MIX[@]}" --tokenizer "$MODEL" --seq-len "$SEQ_LEN" \
  --boundary "$BOUNDARY" --packing "$PACKING" --max-tokens "$((BATCH_TOKENS * STEPS))" --seed "$SEED"

# 02: plain base change (ABF), no temperature; max_position_embeddings -> 64K; both config forms, verified.
step "$RUN/model-theta/manifest.json" \
  "$PY" 02_rope_scale.py --model "$MODEL" --method theta --theta "$ROPE_THETA" --target-len "$SEQ_LEN" \
  --out "$RUN/model-theta"

# 03: FSDP2 over all GPUs, document-masked varlen attention, exact global token-mean loss; resumes if preempted.
step "$RUN/cpt/final/manifest.json" \
  $LAUNCH 03_continued_pretrain.py --model "$RUN/model-theta" --data "$RUN/data" --out "$RUN/cpt" \
  --doc-mask --cp "$CP" --batch-tokens "$BATCH_TOKENS" --max-steps "$STEPS" --lr "$LR" \
  --min-lr-ratio "$MIN_LR_RATIO" --warmup-ratio "$WARMUP_RATIO" --weight-decay "$WEIGHT_DECAY" \
  --betas "$BETA1" "$BETA2" --grad-clip "$GRAD_CLIP" --seed "$SEED" --save-every "$SAVE_EVERY" --final-checkpoint \
  --resume auto

# 05: the base (beyond its 8K window, to show it failing) against the 64K model.
step "$RUN/eval/manifest.json" \
  "$PY" 05_eval.py --models "$MODEL" "$RUN/cpt/final" --seq-len "$EVAL_LEN" \
  --niah-tasks "$NIAH_TASKS" --depths "$DEPTHS" --samples "$EVAL_SAMPLES" --mmlu-data "$MMLU_DATA" \
  --allow-beyond-context ${LM_EVAL_TASKS:+--lm-eval-tasks "$LM_EVAL_TASKS"} $EVAL_EXTRA --out "$RUN/eval"
