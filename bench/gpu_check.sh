#!/usr/bin/env bash
# GPU validation and benchmarks in ONE device call (issue "GPU validation"): installs the carried wheels, runs the
# GPU tests, then the benchmarks, prints a short table last and writes full logs under $OUT.
#
#   here:   echo /.whl/ >> .git/info/exclude; pip download --no-deps ... -d .whl datasets==5.2.0 dill==0.4.1 \
#           multiprocess==0.70.19 liger-kernel==0.8.5     (cp312 manylinux; see the device README)
#   there:  PHASES="env tests bench" bash bench/gpu_check.sh      (device run, carry .whl)
#
# PHASES picks what runs (a call has at most 10 minutes): env, tests, bench, bench-long, bench-shapes, eval.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PHASES=${PHASES:-"env tests bench"}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

has() { [[ " $PHASES " == *" $1 "* ]]; }
bench() { $PY bench/bench_train.py --json "$OUT/bench.jsonl" --md "$OUT/bench.md" "$@" 2>&1 | tee -a "$OUT/bench.log"; }

if has env; then
  { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY - <<'PY'
import importlib, inspect, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for m in ("transformers", "datasets", "liger_kernel", "triton", "flash_attn", "pyarrow", "numpy"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, str(e)[:80])
from torch.nn.attention import varlen
print("varlen_attn", inspect.signature(varlen.varlen_attn))
PY
  } 2>&1 | tee "$OUT/env.log"
fi

if has tests; then
  $PY -m pytest -q -x tests/test_train_gpu.py 2>&1 | tee "$OUT/tests.log"
fi

if has bench; then   # the 1B shape: ours vs the HF baseline at 16K and 64K (targets: 1.5x at 16K, 45% MFU at 64K)
  bench --shapes llama-3.2-1b --seq-lens 16384 65536 --modes ours baseline --steps 3 --time-limit 150
fi
if has bench-long; then   # the longest rows one GPU trains (target: >= 512K for the 1B shape)
  bench --shapes llama-3.2-1b --seq-lens 131072 262144 524288 --modes ours --steps 2 --time-limit 200
fi
if has bench-shapes; then
  bench --shapes llama-3.2-3b "llama-3.1-8b:num_hidden_layers=4" qwen2.5-1.5b --seq-lens 65536 --modes ours \
    --steps 2 --time-limit 150
fi
if has eval; then
  $PY -m pytest -q -m gpu tests/test_eval.py 2>&1 | tee "$OUT/eval.log"
fi

echo "================ summary ================"
[ -f "$OUT/env.log" ] && head -12 "$OUT/env.log"
[ -f "$OUT/tests.log" ] && tail -3 "$OUT/tests.log"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
exit 0
