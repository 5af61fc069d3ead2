#!/usr/bin/env bash
# The embedded demo (`make demo`): the whole longctx pipeline on a tiny model, offline, on a CPU, about 5
# minutes on 2 cores. It extends a 128-token Llama to 512 tokens (4x) the way AFM-4.5B / UltraLong did it and
# measures, for every model, loss by position at 4x, needle retrieval at 1x, 2x and 4x, and short-context
# perplexity, in runs/demo/report.md (with every target of the demo and whether it was met).
#
#   assets/demo_base ----------------------------------------------------------------------> base
#     |-- 02 YaRN x4 ------------------------------------------------------------------------> patched
#     |     `-- 03 continued pretraining at 512 (corpus + key-value documents) -----------------> trained
#     |           `-- 04 distillation from the base at 128 (short text) ------------------------> distilled
#     |                 `-- 06 soup (trained + distilled) ---------------------------------------> final
#     `-- 03 the same continued pretraining WITHOUT 02 (plain RoPE past its window) --------------> control
#   05 evaluates base, patched, trained, distilled, final and control side by side; recipes/demo_report.py
#   writes the report.
#
# The base model (assets/demo_base/, committed) was trained from scratch by recipes/train_demo_base.sh on the
# embedded corpus (Python standard-library packages, KJV books) plus key-value retrieval documents in the form
# of 05's `kv` NIAH prompts (recipes/demo_data.py), so that it retrieves needles inside its 128-token window.
#
#   bash recipes/tiny_demo.sh                     # the demo (DEMO_SCALE=full)
#   DEMO_SCALE=ci OUT=/tmp/demo bash recipes/tiny_demo.sh    # the same pipeline, tiny sizes (tests, < 3 min)
#   DRY_RUN=1 bash recipes/tiny_demo.sh           # print the commands only
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export MPLBACKEND=Agg

# ---- settings (each overridable from the environment) ----------------------------------------------------------
: "${DEMO_SCALE:=full}"              # full: the demo; ci: every stage with tiny sizes, to prove the pipeline
: "${OUT:=runs/demo}"
: "${BASE:=assets/demo_base}"        # tiny Llama, 128-token context, + its tokenizer (recipes/train_demo_base.sh)
if [[ -z ${SEQ:-} ]]; then             # the base's native context: its config's max_position_embeddings
  SEQ=$(sed -n 's/.*"max_position_embeddings": *\([0-9]*\).*/\1/p' "$BASE/config.json" 2>/dev/null || true)
  : "${SEQ:=128}"
fi
: "${FACTOR:=4}"                     # YaRN factor: 128 -> 512
: "${SEED:=0}"
LONG=$((SEQ * FACTOR))
if [[ $DEMO_SCALE == full ]]; then
  : "${CPT_STEPS:=150}"              # 03: steps of 4,096 tokens (614K tokens)
  : "${CPT_ROWS:=$((4096 / LONG))}"   # 4,096 tokens per step
  : "${CPT_LR:=1e-3}"                # the base was trained at 2e-3 peak; tiny models take large rates
  : "${KD_STEPS:=40}"                # 04: steps of 4,096 tokens (164K tokens)
  : "${KD_ROWS:=$((4096 / SEQ))}"
  : "${KD_LR:=5e-4}"
  : "${CORPUS_CHARS:=2000000}"       # real text read per source (code, books)
  : "${DEPTHS:=0:100:5}"             # 05: needle depths x samples x lengths 1x, 2x, 4x
  : "${SAMPLES:=4}"
  : "${PPL_DOCS:=16}"                # 05: documents of 4x tokens for loss by position
elif [[ $DEMO_SCALE == ci ]]; then
  : "${CPT_STEPS:=3}"
  : "${CPT_ROWS:=2}"
  : "${CPT_LR:=1e-3}"
  : "${KD_STEPS:=2}"
  : "${KD_ROWS:=4}"
  : "${KD_LR:=5e-4}"
  : "${CORPUS_CHARS:=300000}"
  : "${DEPTHS:=0,100}"
  : "${SAMPLES:=1}"
  : "${PPL_DOCS:=2}"
else
  echo "error: DEMO_SCALE=$DEMO_SCALE is neither full nor ci" >&2
  exit 2
fi
: "${KV_SHARE:=0.5}"                 # share of key-value documents in 03's (and 04's) training tokens
CPT_TOKENS=$((CPT_STEPS * CPT_ROWS * LONG))
KD_TOKENS=$((KD_STEPS * KD_ROWS * SEQ))
KV_LONG_DOCS=$(( (CPT_TOKENS / 2 + LONG - 1) / LONG + 2 ))   # KV_SHARE 0.5 of 03's tokens, one doc per row
KV_SHORT_DOCS=$(( (KD_TOKENS / 2 + SEQ - 1) / SEQ + 2 ))
REAL_W=$(awk "BEGIN {print (1 - $KV_SHARE) / 2}")
M=$OUT/models                        # readable names in 05's reports: a symlink to each stage's model
# Every stage runs on ONE thread; independent stages run side by side (two chains at a time). On a CPU shared
# with other jobs, oversubscribed threads are several times slower than this.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

if [[ $DRY_RUN != 1 ]]; then
  for f in config.json model.safetensors tokenizer.json; do
    if [[ ! -f $BASE/$f ]]; then
      echo "error: $BASE/$f is missing; the demo starts from the committed base model (git checkout" \
           "assets/demo_base, or train it: bash recipes/train_demo_base.sh)" >&2
      exit 2
    fi
  done
  mkdir -p "$OUT/logs" "$M"
  : > "$OUT/timings.tsv"
fi
echo "demo ($DEMO_SCALE): $BASE ($SEQ tokens) -> YaRN x$FACTOR ($LONG tokens); 03: $CPT_STEPS steps x $CPT_ROWS" \
     "rows ($CPT_TOKENS tokens, ${KV_SHARE} key-value); 04: $KD_STEPS steps x $KD_ROWS rows; output $OUT"
T_START=$EPOCHREALTIME

# timed NAME CMD...: run a stage (lib.sh's `step`: printed, skipped under DRY_RUN=1) and append its wall time to
# $OUT/timings.tsv (the report's timing table). Every stage runs afresh (--overwrite): `step` skips a stage only
# when its first argument exists, and /nonexistent never does.
timed() {
  local name=$1 t0=$EPOCHREALTIME
  shift
  step /nonexistent "$@"
  if [[ $DRY_RUN != 1 ]]; then
    printf '%s\t%.1f\n' "$name" "$(awk "BEGIN {print $EPOCHREALTIME - $t0}")" >> "$OUT/timings.tsv"
  fi
}

# side_by_side NAME FN1 FN2: run two shell functions at once, each logging to $OUT/logs/FN.log; fail if either
# failed (after both ended).
side_by_side() {
  local name=$1 t0=$EPOCHREALTIME rc=0 pids=() fn
  shift
  if [[ $DRY_RUN == 1 ]]; then for fn in "$@"; do echo "# $fn (side by side)"; "$fn"; done; return 0; fi
  for fn in "$@"; do
    echo "  $fn: running (log: $OUT/logs/$fn.log)"
    "$fn" > "$OUT/logs/$fn.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      rc=1
      echo "error: $(($i + 1))/${#pids[@]} of '$name' failed; the end of $OUT/logs/${*:$((i + 1)):1}.log:" >&2
      tail -n 8 "$OUT/logs/${*:$((i + 1)):1}.log" >&2
    fi
  done
  printf '%s (wall)\t%.1f\n' "$name" "$(awk "BEGIN {print $EPOCHREALTIME - $t0}")" >> "$OUT/timings.tsv"
  return $rc
}

link() { [[ $DRY_RUN == 1 ]] || ln -sfn "$(realpath "$2")" "$M/$1"; }

# ---- 1. data: real text (code, books) + key-value documents, packed by 01 at 4x (for 03) and 1x (for 04) ------
# kv_and_pack LENGTH DOCS PAIRS TOKENS NAME: key-value documents, then 01 with the real text
kv_and_pack() {
  timed "key-value documents ($1 tokens)" $PY recipes/demo_data.py kv --tokenizer "$BASE" --corpus "$OUT/corpus" \
    --out "$OUT/corpus/kv_$5.jsonl" --num-docs "$2" --doc-tokens $(($1 - 1)) --pairs "$3" --queries 1-2x \
    --seed $((SEED + $1))
  timed "01 pack at $1" $PY 01_prepare_data.py --data "code=$OUT/corpus/code.jsonl@$REAL_W" \
    "books=$OUT/corpus/books.jsonl@$REAL_W" "kv=$OUT/corpus/kv_$5.jsonl@$KV_SHARE" --tokenizer "$BASE" \
    --num-proc 1 --seq-len "$1" --packing best-fit --max-tokens "$4" --seed "$SEED" --out "$OUT/data_$5" \
    --overwrite
}
data_long() { kv_and_pack "$LONG" "$KV_LONG_DOCS" "1-$((LONG / 128))" "$CPT_TOKENS" long; }
data_short_and_yarn() {
  kv_and_pack "$SEQ" "$KV_SHORT_DOCS" "1-$((SEQ / 64))" "$KD_TOKENS" short
  # 02: YaRN x4 on the base, no training
  timed "02 YaRN x$FACTOR" $PY 02_rope_scale.py --model "$BASE" --method yarn --factor "$FACTOR" \
    --out "$OUT/patched" --overwrite
}

# ---- 2. 03 at 4x with YaRN -> 04 -> 06 -> 05, and beside it 03 without 02 (the control) -> 05 ---------------
CPT_FLAGS=(--data "$OUT/data_long" --batch-tokens $((CPT_ROWS * LONG)) --max-steps "$CPT_STEPS" --lr "$CPT_LR"
           --warmup-steps $((CPT_STEPS / 10)) --seed "$SEED" --no-activation-checkpointing --save-every 0
           --no-final-checkpoint --log-every 25 --overwrite)
# 05 measures loss by position and short-context perplexity on text that no model here trained on: the standard
# library's single-file modules (corpus/heldout.jsonl; the corpus holds its packages). Text held out from 03 alone
# would not do: the base was trained on the whole corpus, so that would measure forgetting of what it memorised.
# 03 (YaRN) watches the long/short trade-off as it trains (probes.py): kv needles at 1x/2x/4x tokens, loss by
# position and perplexity on 1x-token text of the same held-out modules, before the first step and every
# EVAL_EVERY steps
: "${EVAL_EVERY:=25}"
PROBE_FLAGS=(--eval-every "$EVAL_EVERY" --probe-niah-task niah_single_kv --probe-data "$OUT/corpus/heldout.jsonl")
EVAL_FLAGS=(--tasks niah,ppl --niah-tasks niah_single_kv,niah_multikey_kv --lengths "$SEQ,$((2 * SEQ)),$LONG"
            --seq-len "$LONG" --depths "$DEPTHS" --samples "$SAMPLES" --max-new-tokens 8 --ppl-docs "$PPL_DOCS"
            --ppl-data "$OUT/corpus/heldout.jsonl"
            --allow-beyond-context --device cpu --seed "$SEED" --overwrite)
yarn_chain() {
  timed "03 continued pretraining at $LONG (YaRN)" $PY 03_continued_pretrain.py --model "$OUT/patched" \
    --out "$OUT/trained" "${CPT_FLAGS[@]}" "${PROBE_FLAGS[@]}"
  # 04: short-context distillation from the base (Arcee's restoration step), on native-length text
  timed "04 distillation at $SEQ" $PY 04_sft.py --model "$OUT/trained/final" --teacher "$BASE" \
    --data "$OUT/data_short" --alpha 0.5 --temperature 2 --batch-tokens $((KD_ROWS * SEQ)) \
    --max-steps "$KD_STEPS" --lr "$KD_LR" --warmup-steps $((KD_STEPS / 10)) --seed "$SEED" \
    --no-activation-checkpointing --save-every 0 --no-final-checkpoint --log-every 10 --out "$OUT/distilled" \
    --overwrite
  # 06: soup of the trained and the distilled model
  timed "06 soup" $PY 06_merge.py --models "$OUT/trained/final" "$OUT/distilled/final" --out "$OUT/final" \
    --overwrite
  link trained "$OUT/trained/final"; link distilled "$OUT/distilled/final"; link final "$OUT/final"
  timed "05 evaluation: trained, distilled, final" $PY 05_eval.py --models "$M/trained" "$M/distilled" \
    "$M/final" "${EVAL_FLAGS[@]}" --out "$OUT/eval_yarn"
}
control_chain() {
  timed "03 continued pretraining at $LONG (control, no 02)" $PY 03_continued_pretrain.py --model "$BASE" \
    --ignore-max-positions --out "$OUT/control" "${CPT_FLAGS[@]}"
  link base "$BASE"; link patched "$OUT/patched"; link control "$OUT/control/final"
  timed "05 evaluation: base, patched, control" $PY 05_eval.py --models "$M/base" "$M/patched" "$M/control" \
    "${EVAL_FLAGS[@]}" --out "$OUT/eval_base"
}

timed "corpus" $PY recipes/demo_data.py corpus --out "$OUT/corpus" --max-chars "$CORPUS_CHARS"
side_by_side "data and 02" data_long data_short_and_yarn
side_by_side "training and evaluation" yarn_chain control_chain
timed "report" $PY recipes/demo_report.py report --eval "$OUT/eval_base" "$OUT/eval_yarn" --demo "$OUT" \
  --base "$BASE" --native "$SEQ" --factor "$FACTOR" --scale "$DEMO_SCALE" --out "$OUT/report.md"
if [[ $DRY_RUN != 1 ]]; then
  printf 'total\t%.1f\n' "$(awk "BEGIN {print $EPOCHREALTIME - $T_START}")" >> "$OUT/timings.tsv"
  $PY recipes/demo_report.py report --eval "$OUT/eval_base" "$OUT/eval_yarn" --demo "$OUT" --base "$BASE" \
    --native "$SEQ" --factor "$FACTOR" --scale "$DEMO_SCALE" --out "$OUT/report.md" --quiet  # with the total
  echo "demo done in $(awk "BEGIN {printf \"%.0f\", $EPOCHREALTIME - $T_START}") s: $OUT/report.md"
fi
