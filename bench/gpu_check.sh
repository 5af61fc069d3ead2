#!/usr/bin/env bash
# The CUDA training path proven and measured in one run of at most 7 minutes on one H100 / H200. Steps run in
# order, each under its own time limit, each writing its log to $OUT as it finishes (a timeout still leaves what
# ran):
#
#   1. env    device, driver, versions, PyTorch's varlen signature, whether varlen_attn takes GQA natively  (30 s)
#   2. tests  tests/test_train_gpu.py: varlen == per-document reference (bf16, grads), packed row == documents
#             alone, Liger on == off (Llama, Qwen2 shapes), 1-GPU FSDP2 bf16 train / checkpoint / resume / export (100 s)
#   3. bench  Llama-3.2-1B shape at 16K and 64K: ours beside the plain HF baseline, one profiled step each   (130 s)
#   4. long   the longest row one GPU trains for the 1B shape: 128K, 256K, 512K, stopping at the first OOM    (140 s)
#   ac        (optional) the 1B shape at 16K without activation checkpointing, ours and the baseline         (100 s)
#
#   beforehand, on a machine with internet access (the GPU machine may have none):
#                pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#                  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
#                pip download ... -d .whl/opt pyarrow==26.0.1 fsspec==2026.9.0   # installed only if the image's are older
#   on the GPU machine, with .whl copied beside the repository:
#                bash bench/gpu_check.sh          (STEPS="bench long" to rerun some steps,
#                TESTS_K="varlen or packed" to run some of the tests)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
STEPS=${STEPS:-"env tests bench long"}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PY:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # datasets 5.2 wants pyarrow >= 24 and fsspec <= 2026.9.0: bring ours only where the image's disagree
  $PY - <<'PY' > /tmp/extra_wheels
from importlib.metadata import version
def v(name):
    try:
        return tuple(int(x) for x in version(name).split(".")[:3] if x.isdigit())
    except Exception:
        return None
need = []
if (v("pyarrow") or (0,)) < (24,):
    need.append("pyarrow")
if v("fsspec") is None or v("fsspec") > (2026, 9, 0):
    need.append("fsspec")
print(" ".join(need))
PY
  for name in $(cat /tmp/extra_wheels); do
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/opt/${name}-*.whl
  done
fi

has() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME SECONDS "COMMAND": run under a time limit, log to $OUT/NAME.log, note the outcome
  local name=$1 limit=$2 t0=$SECONDS
  timeout -k 5 "$limit" bash -o pipefail -c "$3" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "step $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/steps.log"
}

env_report() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "extra wheels installed: $(cat /tmp/extra_wheels 2>/dev/null)"
  $PY - <<'PY'
import importlib, inspect, torch
print("python", __import__("sys").version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for m in ("transformers", "datasets", "liger_kernel", "triton", "flash_attn", "accelerate", "pyarrow", "fsspec",
          "huggingface_hub", "numpy", "pytest", "pytest_timeout"):
    try:
        mod = importlib.import_module(m)
        v = getattr(mod, "__version__", None)
        if v is None:
            from importlib.metadata import version
            v = version(m.replace("_", "-"))
        print(m, v)
    except Exception as e:
        print(m, "MISSING", type(e).__name__, str(e)[:80])
from torch.nn.attention import varlen
print("varlen_attn", inspect.signature(varlen.varlen_attn))
# Does varlen_attn take fewer KV heads than query heads (GQA) without repeating them? (a speed option)
q = torch.randn(300, 8, 64, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
kw = {"window_size": (-1, 0)}
rep = varlen.varlen_attn(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), cu, cu, 200, 200, **kw)
try:
    gqa = varlen.varlen_attn(q, k, v, cu, cu, 200, 200, **kw)
    print("varlen_attn GQA without repeat: max diff vs repeated", (gqa.float() - rep.float()).abs().max().item())
except Exception as e:
    print("varlen_attn GQA without repeat: refused:", type(e).__name__, str(e).splitlines()[0][:160])
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    x @ x
torch.cuda.synchronize()
import time
t = time.perf_counter()
for _ in range(10):
    x @ x
torch.cuda.synchronize()
print(f"bf16 8192^3 matmul: {10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
PY
}

bench() { $PY bench/bench_train.py --json "$OUT/bench.jsonl" --md "$OUT/bench.md" "$@"; }
export -f env_report bench
export PY OUT

has env && step env 30 env_report
# optional plugins: a per-test limit, and the subprocess-heavy tests side by side (correctness, not timing)
PYTEST_FLAGS="$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90") \
$($PY -c "import xdist" 2>/dev/null && echo "-n 3")"
has tests && step tests 100 "$PY -m pytest -q tests/test_train_gpu.py --durations=0 $PYTEST_FLAGS ${TESTS_K:+-k '$TESTS_K'}"
has bench && step bench 130 "bench --shapes llama-3.2-1b --seq-lens 16384 65536 --modes ours baseline \
  --steps 2 --warmup 1 --time-limit 75 --profile"
# Rows of short documents: the varlen kernels' memory does not depend on document lengths (time does).
has long && step long 140 "bench --shapes llama-3.2-1b --seq-lens 131072 262144 524288 --modes ours \
  --docs short --steps 1 --warmup 1 --time-limit 80 --max-len-search"
has ac && step ac 100 "bench --shapes llama-3.2-1b --seq-lens 16384 --modes ours baseline --no-ac \
  --steps 2 --warmup 1 --time-limit 60 --profile"

echo "================ summary ================"
cat "$OUT/steps.log"
[ -f "$OUT/env.log" ] && cat "$OUT/env.log"
[ -f "$OUT/tests.log" ] && tail -25 "$OUT/tests.log"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
exit 0
