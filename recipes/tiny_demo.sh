#!/usr/bin/env bash
# Temporary demo (until the demo issue lands): stage 01 on the built-in corpus, offline, on a CPU.
# Packs Python standard-library packages (code repositories) and the KJV books 1:1 by tokens into 8192-token
# rows with document masking, using the real SmolLM2 tokenizer, and prints the statistics table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
TOK=$($PY tests/assets.py smollm2)
$PY 01_prepare_data.py --tokenizer "$TOK" --seq-len 8192 --boundary mask --packing best-fit \
    --out runs/demo/data --overwrite
