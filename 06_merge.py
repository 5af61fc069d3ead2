"""Stage 06: checkpoint soups. Average Hugging Face checkpoints with weights, optionally interpolated with the
original short-context model, streaming tensor by tensor so that merging two 8B models needs memory for a few
tensors, not for models.

Context extension costs short-context quality (Arcee: MMLU 65.4 -> 55.0 from YaRN alone). Arcee's AFM-4.5B
recipe won it back partly by "iterative merging" of checkpoints from different runs; SmolLM3 recovered RULER
with 0.9 * soup + 0.1 * mid-training checkpoint. The soup here is mergekit's `linear` method with
`normalize: true` (docs/training.md#model-merging-and-soups):

    theta_soup  = sum_k w_k * theta_k / sum_k w_k
    theta_final = lam * theta_soup + (1 - lam) * theta_original        (only with --original)

Usage:
    # equal-weight soup of three runs
    python 06_merge.py --models runs/a/final runs/b/final runs/c/final --out runs/soup
    # weighted soup, then 90/10 interpolation with the original short-context model
    python 06_merge.py --models runs/a/final runs/b/final --weights 2 1 \\
        --original meta-llama/Llama-3.1-8B-Instruct --lam 0.9 --out runs/soup

The merged model takes its config (and therefore its RoPE scaling) and tokenizer from `--config-from`
(default: the first of --models): the original model's short-context rope must not leak into a long model.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import common
import rope
import safe_output

# Tensor dtypes as safetensors names them (the on-disk header), and bytes per element.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
             "original_max_position_embeddings", "partial_rotary_factor")


def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("ingredients")
    g.add_argument("--models", nargs="+", required=True,
                   help="HF model directories or hub names to average (at least one)")
    g.add_argument("--weights", nargs="+", type=common.number(), default=None,
                   help="one weight per model (default: equal); normalised by their sum, which must not be 0")
    g.add_argument("--original", default=None,
                   help="the original short-context model to interpolate with: lam * soup + (1 - lam) * original")
    g.add_argument("--lam", type=common.number(), default=None,
                   help="interpolation weight of the soup against --original (e.g. 0.9); requires --original")
    g = parser.add_argument_group("output")
    g.add_argument("--config-from", default=None,
                   help="model whose config (RoPE scaling included) and tokenizer the soup gets "
                        "(default: the first of --models)")
    g.add_argument("--max-shard-size", type=common.number(above=0), default=5.0,
                   help="largest output safetensors shard in GB (default: 5)")
    common.add_common_args(g, "out", "overwrite", "trust-remote-code", required=["out"])
    return parser.parse_args(argv)


# -------------------------------------------------------------------------------------------------------------
# Reading checkpoints without loading them: tensor names, shapes and dtypes come from the safetensors headers.


@dataclass
class Checkpoint:
    name: str  # as the user gave it
    path: Path  # local directory (hub names resolved to the local cache)
    config: dict
    tensor_files: dict[str, Path]  # tensor name -> the safetensors file holding it
    headers: dict[str, dict]  # tensor name -> {"dtype": "BF16", "shape": [...]}


def read_safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            (length,) = __import__("struct").unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
    except (ValueError, __import__("struct").error, AttributeError) as exc:  # truncated, or not safetensors
        common.fail(f"{path} is not a readable safetensors file ({type(exc).__name__}); re-save or re-download it")
    return header


def open_checkpoint(name: str) -> Checkpoint:
    path = common.model_dir(name, "--models", allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                              "*.jinja", "*.tiktoken"])
    config_path = path / "config.json"
    if not config_path.is_file():
        common.fail(f"{name} has no config.json; pass Hugging Face model directories to --models")
    config = common.read_json(config_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = common.read_json(index).get("weight_map") or common.fail(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        common.fail(f"{name} has no safetensors weights (model.safetensors or an index); re-save it with "
                    f"save_pretrained(safe_serialization=True)")
    tensor_files, headers = {}, {}
    for file in files:
        for tensor, info in read_safetensors_header(path / file).items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                common.fail(f"{name}: tensor {tensor} has dtype {info['dtype']}, which 06 cannot average")
            tensor_files[tensor] = path / file
            headers[tensor] = {"dtype": info["dtype"], "shape": info["shape"]}
    return Checkpoint(name=name, path=path, config=config, tensor_files=tensor_files, headers=headers)


# -------------------------------------------------------------------------------------------------------------
# Checks: same architecture, names, shapes and tokenizer; rope differences are reported, not refused.


def check_compatible(reference: Checkpoint, others: list[Checkpoint], trust_remote_code: bool) -> None:
    ref_arch = (reference.config.get("model_type"), tuple(reference.config.get("architectures") or ()))
    for ck in others:
        arch = (ck.config.get("model_type"), tuple(ck.config.get("architectures") or ()))
        if arch != ref_arch:
            common.fail(f"{ck.name} is a {arch} but {reference.name} is a {ref_arch}; soups need one architecture")
        missing = sorted(set(reference.headers) ^ set(ck.headers))
        if missing:
            common.fail(f"{ck.name} and {reference.name} have different parameter names (e.g. {missing[0]}); "
                        f"merge checkpoints of the same model only")
        for tensor, info in reference.headers.items():
            if ck.headers[tensor]["shape"] != info["shape"]:
                common.fail(f"{tensor} has shape {ck.headers[tensor]['shape']} in {ck.name} but {info['shape']} in "
                            f"{reference.name}; merge checkpoints of the same model size only")
    check_same_tokenizer(reference, others, trust_remote_code)


def check_same_tokenizer(reference: Checkpoint, others: list[Checkpoint], trust_remote_code: bool) -> None:
    ref_tok = common.load_tokenizer(str(reference.path), trust_remote_code)
    ref_vocab = ref_tok.get_vocab()
    for ck in others:
        tok = common.load_tokenizer(str(ck.path), trust_remote_code)
        if tok.get_vocab() != ref_vocab or tok.eos_token != ref_tok.eos_token:
            common.fail(f"{ck.name} has a different tokenizer than {reference.name}; a soup of models with "
                        f"different vocabularies is meaningless")


def rope_differences(source: Checkpoint, others: list[Checkpoint]) -> list[str]:
    """One line per model whose RoPE settings differ from the config the soup takes."""
    ref = {k: source.config.get(k) for k in ROPE_KEYS}
    lines = []
    for ck in others:
        diff = {k: ck.config.get(k) for k in ROPE_KEYS if ck.config.get(k) != ref[k]}
        if diff:
            lines.append(f"note: {ck.name} has other RoPE settings {json.dumps(diff)}; the soup uses those of "
                         f"{source.name}")
    return lines


# -------------------------------------------------------------------------------------------------------------
# Streaming safetensors writer: the header (names, dtypes, shapes, offsets) is known from the inputs, so it is
# written first and then each merged tensor's bytes as soon as it is computed.


def plan_shards(names: list[str], headers: dict[str, dict], max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name in names:
        nbytes = tensor_nbytes(headers[name])
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def tensor_nbytes(info: dict) -> int:
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    return math.prod(info["shape"]) * torch.empty((), dtype=dtype).element_size()


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensors arrive one at a time, in the announced order."""

    def __init__(self, path: Path, names: list[str], headers: dict[str, dict]):
        self.names, self.headers, self.next = names, headers, 0
        offset, table = 0, {"__metadata__": {"format": "pt"}}
        for name in names:
            nbytes = tensor_nbytes(headers[name])
            table[name] = {"dtype": headers[name]["dtype"], "shape": headers[name]["shape"],
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header = json.dumps(table, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format pads the header to 8-byte alignment
        self.file = open(path, "wb")
        self.file.write(len(header).to_bytes(8, "little") + header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.names[self.next]
        info = self.headers[name]
        assert name == expected and list(tensor.shape) == info["shape"], (name, expected)
        assert tensor.dtype == SAFETENSORS_DTYPES[info["dtype"]], (name, tensor.dtype)
        self.file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.next += 1

    def close(self) -> None:
        assert self.next == len(self.names), "not every announced tensor was written"
        self.file.close()


# -------------------------------------------------------------------------------------------------------------
# The soup itself.


def soup_weights(args, n_models: int) -> list[float]:
    weights = args.weights if args.weights is not None else [1.0] * n_models
    if len(weights) != n_models:
        common.fail(f"--weights has {len(weights)} values for {n_models} models; give one weight per model")
    total = sum(weights)
    if abs(total) < 1e-12:
        common.fail(f"--weights {weights} sum to 0, so they cannot be normalised; use weights with a non-zero sum")
    return [w / total for w in weights]


def merge_tensor(name: str, ingredients: list[tuple[Checkpoint, float]], handles: dict, out_dtype) -> torch.Tensor:
    """sum_k w_k * theta_k accumulated in fp32 (fp64 for fp64 tensors); integer tensors must agree exactly."""
    first = load_tensor(name, ingredients[0][0], handles)
    if not first.is_floating_point():
        for ck, _ in ingredients[1:]:
            if not torch.equal(load_tensor(name, ck, handles), first):
                common.fail(f"integer tensor {name} differs between {ingredients[0][0].name} and {ck.name}; "
                            f"it cannot be averaged")
        return first.to(out_dtype)
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    acc = first.to(acc_dtype) * ingredients[0][1]
    for ck, weight in ingredients[1:]:
        acc.add_(load_tensor(name, ck, handles).to(acc_dtype), alpha=weight)
    merged = acc.to(out_dtype)
    if not torch.isfinite(merged).all():  # a NaN / inf weight, or one in an input, or an overflow of the dtype
        bad = [ck.name for ck, _ in ingredients if not torch.isfinite(load_tensor(name, ck, handles)).all()]
        where = f": it is already in {', '.join(bad)}" if bad else ""
        common.fail(f"the merged {name} is not finite (NaN or inf{where}); nothing was written")
    return merged


def load_tensor(name: str, ck: Checkpoint, handles: dict) -> torch.Tensor:
    from safetensors import safe_open

    file = ck.tensor_files[name]
    if file not in handles:
        handles[file] = safe_open(str(file), framework="pt")
    return handles[file].get_tensor(name)


def write_soup(out: Path, source: Checkpoint, ingredients: list[tuple[Checkpoint, float]], max_bytes: int) -> dict:
    names = sorted(source.headers)
    shards = plan_shards(names, source.headers, max_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    handles, weight_map = {}, {}
    progress = tqdm(total=len(names), desc="merging tensors", unit="tensor", disable=not common.is_main_process())
    for file, shard in zip(files, shards):
        writer = SafetensorsStreamWriter(out / file, shard, source.headers)
        for name in shard:
            out_dtype = SAFETENSORS_DTYPES[source.headers[name]["dtype"]]
            writer.write(name, merge_tensor(name, ingredients, handles, out_dtype))
            weight_map[name] = file
            progress.update()
        writer.close()
    progress.close()
    if len(files) > 1:
        total = sum(tensor_nbytes(source.headers[n]) for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"tensors": len(names), "shards": len(files),
            "bytes": sum(tensor_nbytes(source.headers[n]) for n in names)}


def copy_config_and_tokenizer(source: Checkpoint, out: Path, trust_remote_code: bool) -> None:
    """Config (with its RoPE scaling, written in both forms), generation config and tokenizer of --config-from."""
    for file in ("config.json", "generation_config.json"):
        if (source.path / file).is_file():
            shutil.copy2(source.path / file, out / file)
    rope.sync_rope_config_file(out)  # both rope forms, whichever tool wrote the source's config
    common.load_tokenizer(str(source.path), trust_remote_code).save_pretrained(str(out))


def mergekit_yaml(ingredients: list[tuple[Checkpoint, float]], dtype: str) -> str:
    """The same soup as a mergekit config, for users who run mergekit (weights already folded and normalised)."""
    lines = ["merge_method: linear", "parameters:", "  normalize: true", "models:"]
    for ck, weight in ingredients:
        lines += [f"  - model: {ck.name}", "    parameters:", f"      weight: {weight!r}"]
    lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    inputs = {"--models": args.models, "--original": args.original, "--config-from": args.config_from}
    safe_output.check_output(args.out, inputs, args.overwrite)
    if (args.lam is None) != (args.original is None):
        common.fail("--lam and --original go together: lam * soup + (1 - lam) * original")
    if args.lam is not None and not 0.0 <= args.lam <= 1.0:
        common.fail(f"--lam {args.lam} is outside [0, 1]; use e.g. --lam 0.9 for 90% soup, 10% original")
    if args.max_shard_size <= 0:
        common.fail("--max-shard-size must be positive (GB)")

    weights = soup_weights(args, len(args.models))
    models = [open_checkpoint(name) for name in args.models]
    original = open_checkpoint(args.original) if args.original else None
    source = open_checkpoint(args.config_from) if args.config_from else models[0]
    everyone = models + ([original] if original else [])
    check_compatible(source, [ck for ck in everyone if ck is not source], args.trust_remote_code)

    # Fold the interpolation into the soup weights: lam * sum_k w_k theta_k + (1 - lam) * theta_original.
    ingredients = [(ck, w) for ck, w in zip(models, weights)]
    if original is not None:
        ingredients = [(ck, args.lam * w) for ck, w in ingredients] + [(original, 1.0 - args.lam)]
    ingredients = [(ck, w) for ck, w in ingredients if w != 0.0] or ingredients[:1]

    common.print0(f"06_merge: {len(models)} model(s), config and tokenizer from {source.name}")
    for ck, w in ingredients:
        common.print0(f"  {w:+.6f}  {ck.name}")
    for line in rope_differences(source, everyone):
        common.print0(line)

    with safe_output.output_dir(args.out, args.overwrite, inputs) as tmp:
        stats = write_soup(tmp, source, ingredients, int(args.max_shard_size * 1e9))
        copy_config_and_tokenizer(source, tmp, args.trust_remote_code)
        dtype = (source.config.get("dtype") or source.config.get("torch_dtype") or "float32")
        (tmp / "mergekit.yml").write_text(mergekit_yaml(ingredients, str(dtype)))
        recipe = {"method": "linear", "normalize": True, "config_from": source.name,
                  "ingredients": [{"model": ck.name, "weight": w} for ck, w in ingredients],
                  "soup_weights": dict(zip(args.models, weights)), "original": args.original, "lam": args.lam}
        common.write_manifest(tmp, "06_merge", args, inputs=[str(ck.path) for ck in everyone], stats=stats,
                              recipe=recipe)
    common.print0(f"wrote {args.out}: {stats['tensors']} tensors in {stats['shards']} shard(s), "
                  f"{stats['bytes'] / 1e9:.3f} GB")


if __name__ == "__main__":
    common.run_main(main)
