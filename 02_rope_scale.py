"""Stage 02: extend a model's position encoding to a target length by patching its RoPE configuration, with the
frequencies proven rather than trusted.

A wrong RoPE number silently ruins weeks of GPU time, so this script (1) computes every method's inverse
frequencies itself (below), (2) writes the config in BOTH forms, transformers 5 `rope_parameters` and
the legacy `rope_scaling` + `rope_theta` that transformers 4.x and vLLM read, and (3) before the output appears,
rebuilds the model's own rotary embedding with the installed transformers from the written config, read whole,
through `rope_parameters` only and through the legacy keys only, and refuses to finish unless all of them equal
its own frequencies. Weights are hard-linked (same filesystem) or copied, never modified.

Methods (formulas: docs/rope.md):
    yarn     YaRN: pairs with many rotations kept, pairs with < beta_slow rotations divided by s, a ramp linear in
             the pair index between them; cos/sin x attention_factor (default 0.1 ln s + 1)
    theta    ABF / ProLong: a new rope base, plain RoPE (no temperature)
    linear   position interpolation: every frequency / s
    ntk      static NTK-aware: plain RoPE with base b * s^(d/(d-2))
    dynamic  dynamic NTK: the base grows with the running length past the original length (no training)
    llama3   Llama-3.1's scaling: keeps an existing llama3 scaling (pass-through, optionally a new factor)

The factor is always relative to the model's ORIGINAL pretraining length (UltraLong's rule: Llama-3.1 carries
llama3 scaling from 8192, so 1M tokens is factor 128, not 8); re-patching a scaled model replaces its scaling.
`--target-len` derives the factor as target / original.

Usage:
    python 02_rope_scale.py --list-presets
    python 02_rope_scale.py --model meta-llama/Llama-3.1-8B-Instruct --preset ultralong-1m --out runs/ul1m
    python 02_rope_scale.py --model arcee-ai/AFM-4.5B-Base --preset afm-64k --out runs/afm64k --ppl-check doc.txt
    python 02_rope_scale.py --model runs/base --method yarn --target-len 32768 --beta-fast 32 --out runs/yarn32k
    python 02_rope_scale.py --model runs/base --method theta --theta 8e6 --target-len 65536 --dry-run
    # tiny CPU example (any small HF Llama directory)
    python 02_rope_scale.py --model .cache/smollm2-135m-instruct --method yarn --factor 4 --out runs/smol-yarn4

Output: an HF model directory (config in both forms, max_position_embeddings, tokenizer model_max_length and
generation max_length updated), `rope_report.json` + `rope_report.png` (per-pair rope.wavelengths before / after,
YaRN band edges, attention temperature, the perplexity check) and `manifest.json`.
Note: linear and dynamic keep max_position_embeddings at the ORIGINAL length, because transformers' dynamic NTK
and vLLM read it as such (vLLM serves max_position_embeddings x factor); the tokenizer gets the target length.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

import common
import rope
import safe_output

METHODS = ("yarn", "theta", "linear", "ntk", "dynamic", "llama3")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
REWRITTEN = {"config.json", "generation_config.json", "tokenizer_config.json", "manifest.json",
             "rope_report.json", "rope_report.png"}
REL_TOL = 1e-5  # transformers (float32) vs ours (float64); observed differences are ~3e-7


# -------------------------------------------------------------------------------------------------------------
# Published presets [docs/recipes.md#recipes-at-a-glance]. `factor` fixed where the published config fixes it, otherwise
# derived from target_len / the model's original length (UltraLong's rule).

ROPE_PRESETS: dict[str, dict] = {
    "prolong-64k": dict(
        method="theta", theta=8e6, target_len=65536, expected_original=8192,
        source="ProLong (arXiv 2410.02660) Table 9 + train_64K.sh `--config_overrides rope_theta=8000000`: "
               "plain ABF base change, Llama-3-8B-Instruct 8K -> 64K [docs/recipes.md#prolong-final-recipe]"),
    "prolong-512k": dict(
        method="theta", theta=1.28e8, target_len=524288, expected_original=65536,
        source="ProLong (arXiv 2410.02660) Table 9 + train_512K.sh `--config_overrides rope_theta=128000000`: "
               "second stage, continues from the 64K model [docs/recipes.md#prolong-final-recipe]"),
    "ultralong-1m": dict(
        method="yarn", target_len=1048576, beta_fast=4.0, beta_slow=1.0, published_factor=128.0,
        expected_original=8192,
        source="UltraLong (arXiv 2504.06214) §3.1: YaRN alpha=1, beta=4 (beta_slow 1, beta_fast 4), s = 1M / 8192 "
               "= 128 relative to Llama-3.1's ORIGINAL 8K [docs/recipes.md#ultralong-recipe]"),
    "ultralong-2m": dict(
        method="yarn", target_len=2097152, beta_fast=4.0, beta_slow=1.0, published_factor=256.0,
        expected_original=8192,
        source="UltraLong (arXiv 2504.06214) §3.1: YaRN beta_fast 4, beta_slow 1, s = 2M / 8192 = 256 "
               "[docs/recipes.md#ultralong-recipe]"),
    "ultralong-4m": dict(
        method="yarn", target_len=4194304, beta_fast=4.0, beta_slow=1.0, published_factor=512.0,
        expected_original=8192,
        source="UltraLong (arXiv 2504.06214) §3.1: YaRN beta_fast 4, beta_slow 1, s = 4M / 8192 = 512 "
               "[docs/recipes.md#ultralong-recipe]"),
    "afm-64k": dict(
        method="yarn", factor=20.0, target_len=65536, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
        expected_original=4096,
        source="Arcee AFM-4.5B shipped config: yarn factor 20, original 4096, beta 32/1, mscale 1.0, "
               "max_position_embeddings 65536 (factor 20 != 64K/4K = 16 on purpose) "
               "[docs/recipes.md#arcee-published-facts]"),
    "dsv3-yarn": dict(
        method="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
        expected_original=4096,
        source="DeepSeek-V3 config.json rope_scaling: yarn factor 40, original 4096, beta 32/1, mscale = "
               "mscale_all_dim = 1, max_position_embeddings 163840 (what Arcee copied first) "
               "[docs/recipes.md#arcee-published-facts]",
        note="temperature semantics differ by architecture: with mscale = mscale_all_dim = 1 transformers' "
             "attention_factor is 1 (cos/sin unscaled); DeepSeek-V3's own MLA attention multiplies the softmax "
             "scale by get_mscale(40, 1)^2 = 1.874, a Llama/Qwen/Arcee model does not "
             "[docs/rope.md#deepseek-v3-convention]"),
}


def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    common.add_common_args(g, "model", "out", "overwrite", "trust-remote-code")
    g = parser.add_argument_group("what to write")
    g.add_argument("--preset", choices=sorted(ROPE_PRESETS),
                   help="a published setting (printed with its source); explicit flags override its values")
    g.add_argument("--method", choices=METHODS, help="rope method (see above); required unless --preset")
    g.add_argument("--factor", type=common.number(above=0),
                   help="scale s relative to the ORIGINAL pretraining length (>= 1)")
    g.add_argument("--target-len", type=common.number(int, min=1),
                   help="context length to address; factor = target / original unless --factor is also given "
                        "(then it is only the new max_position_embeddings, as AFM's factor 20 with 64K)")
    g.add_argument("--original-len", type=common.number(int, min=1),
                   help="override the original pretraining length (default: read from the config: "
                        "original_max_position_embeddings of yarn/llama3, else max_position_embeddings)")
    g.add_argument("--theta", type=common.number(above=0),
                   help="new rope base (required by --method theta; allowed with any method)")
    g = parser.add_argument_group("yarn / llama3 knobs (transformers defaults when unset)")
    g.add_argument("--beta-fast", type=common.number(above=0),
                   help="yarn: rotations above which a pair is kept (default 32)")
    g.add_argument("--beta-slow", type=common.number(above=0),
                   help="yarn: rotations below which a pair is interpolated (default 1)")
    g.add_argument("--mscale", type=common.number(min=0),
                   help="yarn: mscale (attention_factor = mscale ratio if both set)")
    g.add_argument("--mscale-all-dim", type=common.number(min=0), help="yarn: mscale_all_dim (DeepSeek convention)")
    g.add_argument("--attention-factor", type=common.number(above=0),
                   help="yarn: explicit cos/sin multiplier (overrides mscale)")
    g.add_argument("--no-truncate", dest="truncate", action="store_const", const=False, default=None,
                   help="yarn: do not floor/ceil the ramp edges (truncate false)")
    g.add_argument("--low-freq-factor", type=common.number(above=0),
                   help="llama3: low_freq_factor (default: kept, else 1)")
    g.add_argument("--high-freq-factor", type=common.number(above=0),
                   help="llama3: high_freq_factor (default: kept, else 4)")
    g = parser.add_argument_group("output")
    g.add_argument("--copy-weights", action="store_true",
                   help="copy weight files even on the same filesystem (default: hard links, which share the "
                        "bytes with the source: never write into them in place)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the report, write nothing")
    g.add_argument("--config-only", action="store_true",
                   help="write the patched config, tokenizer and report without weights (refused otherwise when "
                        "--model has no weight files)")
    g.add_argument("--list-presets", action="store_true", help="print the presets with their sources and exit")
    g = parser.add_argument_group("perplexity check (the short-context cost before training)")
    g.add_argument("--ppl-check", metavar="FILE", help="a text file: perplexity before and after the patch")
    common.add_common_args(g, "encoding-errors")
    g.add_argument("--ppl-lengths", default=None,
                   help="comma-separated token counts (default: min(1024, original) and the original length, "
                        "capped by the document)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype for --ppl-check (default: bfloat16 on cuda, float32 on cpu)")
    return parser.parse_args(argv)


# -------------------------------------------------------------------------------------------------------------
# The plan: which rope the output gets, relative to the original pretraining length, and what to tell the user.


def apply_preset(args) -> dict | None:
    """Fill unset flags from --preset; return the preset (or None)."""
    if not args.preset:
        return None
    preset = ROPE_PRESETS[args.preset]
    if args.method and args.method != preset["method"]:
        common.fail(f"--preset {args.preset} is a {preset['method']} setting; drop --method {args.method}")
    args.method = preset["method"]
    for key in ("factor", "target_len", "theta", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if getattr(args, key) is None and preset.get(key) is not None:
            setattr(args, key, preset[key])
    return preset


def plan_rope(args, before: rope.RopeSpec, model_type: str | None, preset: dict | None):
    """(after spec, original length, notes, warnings). Refuses bad input with one clear line."""
    original, factor, target_len, notes = scaling_request(args, before)
    method = args.method
    if preset is not None:
        notes += preset_notes(args, preset, original, factor)
    options = {k: getattr(args, k) for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                             "attention_factor", "truncate", "low_freq_factor", "high_freq_factor")}
    if method != "yarn" and any(options[k] is not None for k in ("beta_fast", "beta_slow", "mscale",
                                                                 "mscale_all_dim", "attention_factor", "truncate")):
        common.fail(f"--beta-fast / --beta-slow / --mscale / --mscale-all-dim / --attention-factor / --no-truncate "
                    f"are yarn settings; they do nothing with --method {method}")
    after = rope.scaled_rope_spec(before, method, original=original, factor=factor, target_len=target_len,
                                  theta=args.theta, **options)
    changes, warnings = explain_change(args, before, after, original, factor, target_len, model_type)
    return after, original, notes + changes, warnings


def scaling_request(args, before: rope.RopeSpec):
    """(original length, factor, target length, notes) of the flags, after refusing those that cannot mean
    anything for this model."""
    notes = []
    if args.original_len is not None:
        if args.original_len <= 0:
            common.fail(f"--original-len {args.original_len} must be positive")
        original, why = args.original_len, "--original-len"
    else:
        original, why = rope.original_context_length(before)
    notes.append(f"original pretraining length {original} ({why})")
    method = args.method
    if method is None:
        common.fail("choose --method (yarn, theta, linear, ntk, dynamic, llama3) or --preset; see --list-presets")
    if args.factor is not None and args.factor < 1:
        common.fail(f"--factor {args.factor:g} < 1 would shrink the context; use a factor >= 1")
    if args.target_len is not None and args.target_len < original:
        common.fail(f"--target-len {args.target_len} is shorter than the original pretraining length {original}; "
                    f"02 only extends the context")
    if args.theta is not None and not args.theta > 0:
        common.fail(f"--theta {args.theta:g} must be positive")
    if method == "theta":
        if args.theta is None:
            common.fail("--method theta needs --theta (ProLong: 8e6 for 64K, 1.28e8 for 512K)")
        if args.factor is not None:
            common.fail("--method theta changes the base only; use --theta (and --target-len), not --factor")
    factor, target_len = args.factor, args.target_len
    if method == "llama3" and factor is None and target_len is None:
        if before.rope_type != "llama3":
            common.fail("--method llama3 without --factor / --target-len passes an existing llama3 scaling "
                        f"through, but this model has {before.rope_type} RoPE")
        factor, target_len = before.scale, before.max_position_embeddings
        notes.append(f"pass-through of the existing llama3 scaling ({before.describe()}), written in both forms")
    if method != "theta" and factor is None and args.target_len is None:
        common.fail(f"--method {method} needs --factor or --target-len (relative to the original length {original})")
    if method == "llama3" and before.rope_type != "llama3":
        notes.append("no llama3 scaling to keep: low_freq_factor / high_freq_factor default to Meta's 1 / 4")
    return original, factor, target_len, notes


def preset_notes(args, preset: dict, original: int, factor: float | None) -> list[str]:
    """Where this model differs from the one a preset was published for."""
    notes = []
    if preset.get("expected_original") and preset["expected_original"] != original:
        notes.append(f"preset {args.preset} was published for an original length of {preset['expected_original']}; "
                     f"this model's is {original}")
    if preset.get("published_factor") and factor is None and args.target_len:
        derived = args.target_len / original
        if abs(derived - preset["published_factor"]) > 1e-9:
            notes.append(f"published factor {preset['published_factor']:g} assumed an 8K original; for this "
                         f"model {args.target_len} / {original} = factor {derived:g}")
    return notes


def explain_change(args, before, after, original: int, factor, target_len, model_type: str | None):
    """(notes, warnings): what happened to an existing scaling, and the traps worth a line each; refuses a
    YaRN setting that cannot work."""
    method = args.method
    notes, warnings = [], []
    if before.rope_type != "default" and not (method == "llama3" and before.rope_type == "llama3"):
        notes.append(f"the model is already scaled: {before.describe()}, addressing "
                     f"{rope.addressable_length(before)} tokens; the new setting REPLACES it and is relative to "
                     f"the same original {original} tokens "
                     f"(factors are not multiplied): {after.describe()}")
    if args.theta is not None and method != "theta":
        notes.append(f"rope base changed {before.theta:g} -> {after.theta:g} together with {method}")
    if method == "ntk":
        s = factor if factor is not None else target_len / original
        base = before.theta if args.theta is None else args.theta
        notes.append(f"static NTK: base {base:g} x {s:g}^({after.rotary_dim}/{after.rotary_dim - 2}) = "
                     f"{after.theta:.6g}, written as plain RoPE")
    if method in rope.TYPES_KEEPING_MAX_AT_ORIGINAL:
        notes.append(f"{method}: max_position_embeddings stays at the original {original} (transformers' dynamic "
                     f"NTK and vLLM read it as the original length); the tokenizer gets "
                     f"{rope.addressable_length(after)}")
    if after.rope_type in ("yarn", "llama3") and target_len is not None:
        implicit = target_len / original
        if abs(implicit - after.scale) > 1e-9:
            warnings.append(f"factor {after.scale:g} != max_position_embeddings / original = {target_len} / "
                            f"{original} = {implicit:g}; written as given (AFM ships factor 20 with 64K on purpose)")
    deepseek_attention = model_type in rope.MSCALE_ALL_DIM_IN_ATTENTION
    unmatched_mscale = after.mscale_all_dim and not deepseek_attention and after.attention_factor is None
    if after.rope_type == "yarn" and unmatched_mscale:
        deepseek = rope.yarn_get_mscale(after.scale, after.mscale_all_dim) ** 2
        warnings.append(f"mscale_all_dim is a DeepSeek convention: DeepSeek's attention multiplies its softmax by "
                        f"{deepseek:.4f}, but a model of type {model_type} does not, so here q.k logits scale by "
                        f"{rope.attention_logit_scale(after, model_type)['logit_multiplier']:.4f}; to reproduce "
                        f"DeepSeek's temperature pass --attention-factor {math.sqrt(deepseek):.4f}")
    if after.rope_type == "yarn" and after.mscale_all_dim and not after.mscale and deepseek_attention:
        warnings.append("mscale_all_dim without mscale: transformers scales cos/sin by 0.1 ln s + 1 AND DeepSeek "
                        "attention scales the softmax again (logits x3.51 at s = 40); set both, as DeepSeek does")
    if after.rope_type == "yarn" and (after.beta_fast or 32) <= (after.beta_slow or 1):
        common.fail(f"YaRN needs beta_fast > beta_slow (got {after.beta_fast or 32:g} <= {after.beta_slow or 1:g}): "
                    "pairs with more than beta_fast rotations are kept, those with fewer than beta_slow interpolated; "
                    "e.g. --beta-fast 32 --beta-slow 1 (transformers' defaults)")
    if after.rotary_dim != before.rotary_dim:
        common.fail(f"rotary dimension would change {before.rotary_dim} -> {after.rotary_dim}; this is a bug")
    return notes, warnings


# -------------------------------------------------------------------------------------------------------------
# Reports: per-dimension wavelengths before / after, YaRN band edges, attention temperature, PNG.


def yarn_bands(spec: rope.RopeSpec) -> dict | None:
    """For a yarn spec: the ramp edges and which pairs are extrapolated (kept), ramped or interpolated (/s)."""
    if spec.rope_type != "yarn":
        return None
    dim, original = spec.rotary_dim, rope.scaling_original(spec)
    low, high = rope.yarn_band_edges(dim, spec.theta, original, spec.beta_fast, spec.beta_slow, spec.truncate)
    ramp = rope.yarn_ramp(low, high, dim // 2)
    return {"low": low, "high": high,
            "dim_at_beta_fast": rope.yarn_correction_dim(spec.beta_fast or 32, dim, spec.theta, original),
            "dim_at_beta_slow": rope.yarn_correction_dim(spec.beta_slow or 1, dim, spec.theta, original),
            "extrapolated": [i for i, r in enumerate(ramp.tolist()) if r == 0.0],
            "ramped": [i for i, r in enumerate(ramp.tolist()) if 0.0 < r < 1.0],
            "interpolated": [i for i, r in enumerate(ramp.tolist()) if r == 1.0]}


def rope_report(before: rope.RopeSpec, after: rope.RopeSpec, model_type: str | None = None,
                original: int | None = None) -> dict:
    """Everything a user should see before training on a rope change, as a JSON-able dict: both settings, the
    lengths, the attention temperature before / after, YaRN bands, and per pair i: inv_freq, wavelength,
    rotations over the original length and the stretch lambda_after / lambda_before."""
    original = original or rope.original_context_length(before)[0]
    inv_b, _ = rope.rope_frequencies(before)
    inv_a, _ = rope.rope_frequencies(after)
    if inv_b.shape != inv_a.shape:
        common.fail(f"rotary dimension changed ({2 * inv_b.numel()} -> {2 * inv_a.numel()}); this is a bug")
    wl_b, wl_a = rope.wavelengths(inv_b), rope.wavelengths(inv_a)
    dims = [{"pair": i, "inv_freq_before": float(inv_b[i]), "inv_freq_after": float(inv_a[i]),
             "wavelength_before": float(wl_b[i]), "wavelength_after": float(wl_a[i]),
             "rotations_over_original": float(original / wl_b[i]), "stretch": float(wl_a[i] / wl_b[i])}
            for i in range(inv_b.numel())]
    report = {
        "model_type": model_type,
        "before": before.to_dict(), "after": after.to_dict(),
        "describe_before": before.describe(), "describe_after": after.describe(),
        "original_length": original,
        "addressable_before": rope.addressable_length(before), "addressable_after": rope.addressable_length(after),
        "attention_before": rope.attention_logit_scale(before, model_type),
        "attention_after": rope.attention_logit_scale(after, model_type),
        "yarn_bands": yarn_bands(after),
        "dims": dims,
        "notes": rope_compat_notes(after),
    }
    return report


def rope_compat_notes(spec: rope.RopeSpec) -> list[str]:
    """How other loaders / versions read this setting differently [docs/rope.md#version-pitfalls]."""
    notes = []
    if spec.rope_type == "yarn" and spec.max_position_embeddings and spec.original_max_position_embeddings:
        implicit = spec.max_position_embeddings / spec.original_max_position_embeddings
        if abs(implicit - spec.scale) > 1e-9:
            notes.append(f"factor {spec.scale:g} != max_position_embeddings / original = {implicit:g}: "
                         f"transformers 5 warns and uses {spec.scale:g}; transformers 4.51-4.55 silently used "
                         f"{implicit:g} (transformers issue #38224); vLLM sizes its context as original x factor = "
                         f"{int(spec.original_max_position_embeddings * spec.scale)}")
        notes.append("transformers <= 4.50 computed the YaRN ramp from max_position_embeddings instead of "
                     "original_max_position_embeddings (different band edges); use >= 4.56 or 5.x")
    if spec.rope_type in ("yarn", "linear", "dynamic", "llama3") and spec.partial_rotary_factor not in (None, 1.0):
        notes.append("partial_rotary_factor < 1 with a scaled rope: transformers' Llama-family attention rotates "
                     "the whole head for default RoPE but only the fraction for scaled types (shape mismatch)")
    return notes


def format_rope_report(report: dict) -> str:
    """The report as printed: settings, lengths, temperature, bands, then a per-pair table (every pair for
    d <= 128, else every 4th)."""
    ab, aa = report["attention_before"], report["attention_after"]
    lines = [f"rope before: {report['describe_before']}",
             f"rope after:  {report['describe_after']}",
             f"original length {report['original_length']}; addresses {report['addressable_before']} -> "
             f"{report['addressable_after']} tokens",
             f"attention: cos/sin x{ab['attention_factor']:.4f} -> x{aa['attention_factor']:.4f}; q.k logits "
             f"x{ab['logit_multiplier']:.4f} -> x{aa['logit_multiplier']:.4f} (temperature t = "
             f"{ab['temperature']:.4f} -> {aa['temperature']:.4f})"]
    if aa["extra_softmax_scale"] != 1.0:
        lines.append(f"  (includes this architecture's softmax x{aa['extra_softmax_scale']:.4f} from mscale_all_dim)")
    bands = report.get("yarn_bands")
    if bands:
        n = len(report["dims"])
        lines.append(f"yarn band edges {bands['low']} -> {bands['high']}: pairs <= {bands['low']} kept (extrapolated), "
                     f"{bands['low'] + 1}..{bands['high'] - 1} ramped, {bands['high']}..{n - 1} interpolated (/s)  "
                     f"[dim_at(beta_fast) = "
                     f"{bands['dim_at_beta_fast']:.2f}, dim_at(beta_slow) = {bands['dim_at_beta_slow']:.2f}]")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    dims = report["dims"]
    step = 1 if len(dims) <= 64 else 4
    lines.append(f"{'pair':>4} {'wavelength before':>18} {'after':>14} {'stretch':>9} {'rot/orig':>10}")
    for row in dims[::step] + ([dims[-1]] if (len(dims) - 1) % step else []):
        lines.append(f"{row['pair']:>4} {row['wavelength_before']:>18.1f} {row['wavelength_after']:>14.1f} "
                     f"{row['stretch']:>9.4f} {row['rotations_over_original']:>10.3g}")
    return "\n".join(lines)


def plot_rope_report(report: dict, path: str | os.PathLike) -> None:
    """PNG of wavelength vs pair index before / after (log scale), the original and new lengths as horizontal
    lines and the YaRN ramp shaded. Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = report["dims"]
    pairs = [r["pair"] for r in dims]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.semilogy(pairs, [r["wavelength_before"] for r in dims], "o-", ms=3, label=report["describe_before"])
    ax.semilogy(pairs, [r["wavelength_after"] for r in dims], "s-", ms=3, label=report["describe_after"])
    ax.axhline(report["original_length"], color="gray", ls="--", lw=1,
               label=f"original length {report['original_length']}")
    if report.get("addressable_after"):
        ax.axhline(report["addressable_after"], color="black", ls=":", lw=1,
                   label=f"addressable after {report['addressable_after']}")
    bands = report.get("yarn_bands")
    if bands:
        ax.axvspan(bands["low"], bands["high"], color="orange", alpha=0.15,
                   label=f"YaRN ramp (pairs {bands['low']}..{bands['high']})")
    ax.set_xlabel("dimension pair i")
    ax.set_ylabel("wavelength 2*pi/theta_i (tokens)")
    ax.set_title("RoPE wavelength per dimension pair")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------------
# Writing the output directory: links or copies, the rewritten configs.


def link_or_copy(src: Path, dst: Path, copy: bool) -> str:
    """Hard-link `src` to `dst` (same filesystem), else copy it. Returns "linked" or "copied"."""
    if not copy:
        try:
            os.link(src.resolve(), dst)
            return "linked"
        except OSError:  # another filesystem (EXDEV), or links not allowed: copy
            pass
    shutil.copy2(src.resolve(), dst)
    return "copied"


def write_files(src: Path, out: Path, config: dict, after: rope.RopeSpec, copy_weights: bool,
                config_only: bool = False) -> dict:
    """Weights linked / copied untouched (none with config_only), small files copied, the configs rewritten.
    Returns file statistics."""
    stats = {"linked": [], "copied": [], "skipped": [], "weight_bytes": 0}
    for path in sorted(src.iterdir()):
        if path.name in REWRITTEN or path.name.startswith("."):
            continue
        if path.is_dir() or (config_only and path.name.endswith(WEIGHT_SUFFIXES)):
            stats["skipped"].append(path.name + "/" * path.is_dir())  # e.g. Meta's original/ with its own rope
            continue
        if path.name.endswith(WEIGHT_SUFFIXES):
            stats[link_or_copy(path, out / path.name, copy_weights)].append(path.name)
            stats["weight_bytes"] += path.stat().st_size
        else:
            shutil.copy2(path.resolve(), out / path.name)
            stats["copied"].append(path.name)
    target = rope.addressable_length(after)
    (out / "config.json").write_text(json.dumps(rope.apply_rope_to_config(config, after), indent=2) + "\n")
    for name, key in (("tokenizer_config.json", "model_max_length"), ("generation_config.json", "max_length")):
        if not (src / name).is_file():
            continue
        data = common.read_json(src / name)
        if name == "tokenizer_config.json" or key in data:  # generation max_length only when the model sets one
            data[key] = target
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
        stats["copied"].append(name)
    return stats


# -------------------------------------------------------------------------------------------------------------
# Verification: the installed transformers, reading the written config three ways, must give our frequencies.


def config_views(config: dict) -> dict[str, dict]:
    """The written config as transformers 5 sees it whole, through `rope_parameters` only (a v5-only reader), and
    through `rope_scaling` + `rope_theta` only (what transformers 4.x / vLLM read)."""
    v5 = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    return {"both forms": config, "rope_parameters only": v5, "rope_scaling + rope_theta only": legacy}


def verify_written_config(config: dict, after: rope.RopeSpec) -> dict:
    """Max relative difference between our inv_freq / attention factor and (a) our reader and (b) the installed
    transformers' own rotary embedding, for each view of the written config. Fails on a mismatch."""
    ours, ours_af = rope.rope_frequencies(after)
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # its factor-mismatch warnings are ours already, said once
    result = {}
    try:
        for view, cfg in config_views(config).items():
            reread, reread_af = rope.rope_frequencies(rope.rope_spec_from_config(cfg))
            entry = {"reader_rel_diff": _rel(reread, ours), "reader_attention_factor": reread_af}
            try:
                theirs, their_af, how = transformers_rope(cfg)
            except Exception as exc:  # unknown family / remote code: our own check still stands
                entry["transformers"] = f"not checked ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                result[view] = entry
                continue
            if theirs.numel() != ours.numel():
                common.fail(f"transformers' {how} rotates {2 * theirs.numel()} channels but the {after.rope_type} "
                            f"setting rotates {2 * ours.numel()} (partial_rotary_factor "
                            f"{after.partial_rotary_factor}); this architecture cannot take that setting")
            entry.update({"transformers": how, "rel_diff": _rel(theirs, ours), "attention_factor": their_af})
            result[view] = entry
            bad = max(entry["rel_diff"], entry["reader_rel_diff"]) > REL_TOL or \
                abs(their_af - ours_af) > REL_TOL * ours_af or abs(reread_af - ours_af) > REL_TOL * ours_af
            if bad:
                common.fail(f"reading the written config ({view}) gives other frequencies than intended "
                            f"(max rel diff {entry['rel_diff']:.2e}, attention factor {their_af} vs {ours_af}); "
                            f"not writing it. Please report this with the model's config.json")
    finally:
        tf_logger.setLevel(level)
    return result


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(((a - b).abs() / b.abs()).max())


# -------------------------------------------------------------------------------------------------------------
# What transformers itself computes (for checks): the model's own rotary embedding module, built from a config.


def transformers_rope(config: Any, seq_len: int | None = None) -> tuple[torch.Tensor, float, str]:
    """(inv_freq, attention_scaling, how) as the installed transformers computes them for `config` (a
    config.json dict or a transformers config): the model family's own `<Family>RotaryEmbedding` built from the
    config when it can be found (the exact code path of a loaded model), else `ROPE_INIT_FUNCTIONS`. Raises
    for families transformers does not know (remote code)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if isinstance(config, dict):
        d = dict(config)
        model_type = d.pop("model_type", None)
        config = transformers.AutoConfig.for_model(model_type, **d)
    rope_type = config.rope_parameters.get("rope_type", config.rope_parameters.get("type", "default"))
    if seq_len is None:
        module = _rotary_module(config)
        if module is not None:
            return module.inv_freq.detach().clone(), float(module.attention_scaling), type(module).__name__
    if rope_type == "default":
        dim = rope.rope_spec_from_config(config).rotary_dim
        inv_freq, scaling = rope.base_inv_freq(config.rope_parameters["rope_theta"], dim).float(), 1.0
        return inv_freq, scaling, "default formula (no rotary module found)"
    kwargs = {"seq_len": seq_len} if seq_len is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    return inv_freq, float(scaling), f"ROPE_INIT_FUNCTIONS[{rope_type!r}]"


def _rotary_module(config):
    """The family's rotary embedding module built from `config`, or None (unknown family / signature)."""
    import importlib

    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if cls_name is None:
            return None
        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        prefix = cls_name.removesuffix("ForCausalLM")
        names = [f"{prefix}RotaryEmbedding"] + sorted(n for n in vars(module) if n.endswith("RotaryEmbedding"))
        for name in names:
            cls = getattr(module, name, None)
            if cls is None:
                continue
            try:
                return cls(config=config)
            except Exception:  # a sub-module variant with another signature: try the next one
                continue
    except Exception:
        return None
    return None


# -------------------------------------------------------------------------------------------------------------
# Perplexity before / after on a user document (the short-context cost of the patch, before any training).


def parse_lengths(text: str | None, original: int, n_tokens: int) -> list[int]:
    if text:
        try:
            lengths = sorted({int(x) for x in text.split(",") if x.strip()})
        except ValueError:
            common.fail(f"--ppl-lengths {text!r} must be comma-separated integers, e.g. 1024,4096")
        if not lengths or lengths[0] < 16:
            common.fail("--ppl-lengths must be token counts >= 16")
    else:
        lengths = sorted({min(1024, original), original})
    too_long = [n for n in lengths if n > n_tokens]
    lengths = [n for n in lengths if n <= n_tokens] or [n_tokens]
    if too_long:
        common.print0(f"note: --ppl-check document has {n_tokens} tokens; lengths {too_long} skipped")
    return lengths


def perplexity_check(args, src: Path, out: Path, original: int) -> list[dict]:
    path = Path(args.ppl_check)
    if not path.is_file():
        common.fail(f"--ppl-check {args.ppl_check} is not a file; pass a plain-text document")
    tok = common.load_tokenizer(str(src), args.trust_remote_code)
    ids = tok(common.read_text(path, args.encoding_errors))["input_ids"]
    if len(ids) < 16:
        common.fail(f"--ppl-check {path} has only {len(ids)} tokens; give a longer document")
    lengths = parse_lengths(args.ppl_lengths, original, len(ids))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    rows = {n: {"length": n} for n in lengths}
    for tag, model_dir in (("before", src), ("after", out)):
        model = common.load_model(str(model_dir), dtype=dtype, device=device,
                                  trust_remote_code=args.trust_remote_code)
        for n in lengths:
            x = torch.tensor([ids[:n]], device=device)
            rows[n][f"ppl_{tag}"] = math.exp(float(common.token_nll(model, x).mean()))
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    out_rows = []
    common.print0(f"perplexity on {path.name} ({device}, {str(dtype).removeprefix('torch.')}):")
    common.print0(f"{'tokens':>9} {'before':>10} {'after':>10} {'change':>8}")
    for n in lengths:
        row = rows[n]
        row["change"] = row["ppl_after"] / row["ppl_before"] - 1
        common.print0(f"{n:>9} {row['ppl_before']:>10.3f} {row['ppl_after']:>10.3f} {row['change']:>+8.1%}")
        out_rows.append(row)
    return out_rows


# -------------------------------------------------------------------------------------------------------------


def list_presets() -> None:
    for name, preset in ROPE_PRESETS.items():
        keys = {k: v for k, v in preset.items() if k not in ("source", "note", "expected_original")}
        common.print0(f"{name}: {json.dumps(keys)}\n    source: {preset['source']}")
        if preset.get("note"):
            common.print0(f"    note: {preset['note']}")


def main(argv=None):
    args = parse_args(argv)
    if args.list_presets:
        list_presets()
        return
    if not args.model:
        common.fail("--model is required (a Hugging Face model directory or hub name)")
    if not args.out and not args.dry_run:
        common.fail("--out is required (or --dry-run to only print the plan)")
    inputs = {"--model": args.model, "--ppl-check": args.ppl_check}
    if args.out:
        safe_output.check_output(args.out, inputs, args.overwrite)
    if args.config_only and args.ppl_check:
        common.fail("--ppl-check runs the model, which --config-only does not write; drop one of them")
    preset = apply_preset(args)
    src = common.model_dir(args.model, ignore_patterns=["original/*"])  # not Meta's own-format copy
    if not (src / "config.json").is_file():
        common.fail(f"{args.model} has no config.json; pass a Hugging Face model directory")
    config = common.read_json(src / "config.json")
    if not isinstance(config, dict):
        common.fail(f"{src / 'config.json'} holds no JSON object; pass a Hugging Face model directory")
    model_type = config.get("model_type")
    before = rope.rope_spec_from_config(config)
    after, original, notes, warnings = plan_rope(args, before, model_type, preset)

    common.print0(f"02_rope_scale: {args.model} ({model_type})")
    if preset is not None:
        common.print0(f"preset {args.preset}: {preset['source']}")
        if preset.get("note"):
            common.print0(f"  note: {preset['note']}")
    for line in notes:
        common.print0(f"note: {line}")
    for line in warnings:
        common.print0(f"warning: {line}")
    report = rope_report(before, after, model_type, original)
    common.print0(format_rope_report(report))
    if args.dry_run:
        return
    if not args.config_only and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in src.iterdir()):
        common.fail(f"{args.model} has no weight files ({', '.join(WEIGHT_SUFFIXES)}), so the output would be a "
                    "model without weights; pass --config-only to write the patched config alone")

    with safe_output.output_dir(args.out, args.overwrite, inputs) as tmp:
        files = write_files(src, tmp, config, after, args.copy_weights, args.config_only)
        written = json.loads((tmp / "config.json").read_text())
        report["verification"] = verify_written_config(written, after)
        checked = [v for v, e in report["verification"].items() if "rel_diff" in e]
        worst = max((e["rel_diff"] for e in report["verification"].values() if "rel_diff" in e), default=None)
        common.print0(f"verified: transformers {__import__('transformers').__version__} reads the written config "
                      f"({', '.join(checked) or 'no view could be built'}) with the intended frequencies"
                      + (f" (max rel diff {worst:.1e})" if worst is not None else ""))
        if args.ppl_check:
            report["ppl_check"] = perplexity_check(args, src, tmp, original)
        report.update({"preset": args.preset, "method": args.method, "notes": notes + report["notes"],
                       "warnings": warnings, "files": files})
        (tmp / "rope_report.json").write_text(json.dumps(common.jsonable(report), indent=2) + "\n")
        plot_rope_report(report, tmp / "rope_report.png")
        common.write_manifest(
            tmp, "02_rope_scale", args, inputs=[str(src)],
            stats={"linked": len(files["linked"]), "copied": len(files["copied"]),
                   "weight_bytes": files["weight_bytes"]},
            rope={"method": args.method, "preset": args.preset, "before": before.to_dict(),
                  "after": after.to_dict(), "original_max_position_embeddings": original,
                  "addressable_length": rope.addressable_length(after), "notes": notes, "warnings": warnings})
    how = "hard-linked" if files["linked"] else "copied"
    n_weights = len(files["linked"]) + sum(f.endswith(WEIGHT_SUFFIXES) for f in files["copied"])
    common.print0(f"wrote {args.out}: {n_weights} weight file(s) {how} ({files['weight_bytes'] / 1e9:.3f} GB, "
                  f"unmodified), rope_report.json/.png")
    if files["linked"]:
        common.print0("note: hard-linked weights share their bytes with the source; never write into them in place "
                      "(use --copy-weights for independent files)")
    if files["skipped"]:
        common.print0(f"note: subdirectories not copied: {', '.join(files['skipped'])}")


if __name__ == "__main__":
    common.run_main(main)
