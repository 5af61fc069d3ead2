"""Export a model trained with FSDP2 (fsdp_train.py) as an ordinary Hugging Face directory that transformers,
vLLM and every longctx stage load as they are: 03 and 04 write OUT/final with it.

- full tensors gathered one parameter at a time to rank 0 (CPU, the export dtype), never a whole model per rank;
- safetensors shards with their index (huggingface_hub's own writer), no lm_head copy for tied embeddings;
- config.json from the model directory the run started from (RoPE settings exactly as 02 wrote them), its dtype
  set to the export's and its RoPE settings in both forms (rope.both_forms: transformers 4.x and vLLM read
  `rope_scaling`, transformers 5 writes only `rope_parameters`); generation_config.json and the tokenizer copied;
  manifest.json with lineage;
- written in a temporary directory and renamed into place when complete (safe_output.output_dir).

Outside this repository (copy this file, rope.py, safe_output.py and common.py), after training a sharded model:

    import hf_export
    dtype = hf_export.export_dtype("auto", hf_export.config_dtype(config), torch.bfloat16)  # before training
    hf_export.export_hf(model, config, "runs/x/final", dtype, model_dir="models/base",
                        tokenizer_dir="models/base", manifest={"stage": "mine", "args": {}})  # every rank calls it
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import rope
import safe_output
from common import atomic_write_text, load_tokenizer, read_json, write_manifest

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --export-dtype names


def config_dtype(config) -> torch.dtype | None:
    """The dtype the input model's config declares (None for a random init or an unusual one). Read it before
    prepare_model, which turns the model into fp32 master weights."""
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)


def export_dtype(flag: str, source: torch.dtype | None, compute: torch.dtype) -> torch.dtype:
    """OUT/final's dtype: --export-dtype, or for "auto" the input model's own dtype (a fine-tuned model ships as
    it came), else the compute dtype."""
    return EXPORT_DTYPES[flag] if flag != "auto" else (source or compute)


def export_config_dict(config, model_dir: str | None, dtype: torch.dtype) -> dict:
    """config.json for the export: the model directory's own config.json (rope parameters exactly as 02 wrote
    them) when there is one, else the config's own dict; the dtype set to the export's."""
    dtype_name = str(dtype).replace("torch.", "")
    src = Path(model_dir) / "config.json" if model_dir else None
    if src is not None and src.is_file():
        d = read_json(src)
    else:
        d = config.to_dict()
        d.pop("_attn_implementation", None)
    d.pop("attn_implementation", None)
    d.pop("_attn_implementation_autoset", None)
    d["dtype"] = dtype_name
    if "torch_dtype" in d:
        d["torch_dtype"] = dtype_name
    return d


def gather_full_state_dict(model, dtype: torch.dtype) -> dict:
    """Full tensors on rank 0 (CPU, `dtype`), gathered one parameter at a time (collective; other ranks get {})."""
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            out[name] = full.detach().to("cpu", dtype=dtype if full.is_floating_point() else full.dtype).clone()
    return out


def export_hf(model, config, out: str | os.PathLike, dtype: torch.dtype, model_dir: str | None,
              tokenizer_dir: str | None, manifest: dict) -> Path:
    """Write `out` as an HF model directory that transformers, 04, 05 and vLLM load as is. Collective."""
    from huggingface_hub import save_torch_state_dict

    state = gather_full_state_dict(model, dtype)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(out)
    if rank == 0:
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        with safe_output.output_dir(out, overwrite=True, lock=False) as tmp:  # OUT itself is locked: 03/04
            save_torch_state_dict(state, tmp, max_shard_size="5GB")  # sharded safetensors + index, as HF writes
            config_dict = rope.both_forms(export_config_dict(config, model_dir, dtype))
            atomic_write_text(tmp / "config.json", json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
            if model_dir and (Path(model_dir) / "generation_config.json").is_file():
                shutil.copy(Path(model_dir) / "generation_config.json", tmp / "generation_config.json")
            if tokenizer_dir:
                tok = load_tokenizer(tokenizer_dir)
                tok.save_pretrained(str(tmp))
            write_manifest(tmp, manifest.pop("stage"), manifest.pop("args"), **manifest)
    if dist.is_initialized():
        dist.barrier()
    return out
