"""RoPE settings of one model: read from any config form, scaled by any method, written back in both forms.

A long-context recipe starts by changing the rotary position embedding: a larger base (ProLong), YaRN relative
to the ORIGINAL pretraining length (UltraLong, Arcee), Llama-3 scaling, linear interpolation, static or dynamic
NTK. This module holds:
- `RopeSpec`: one model's rotary settings, whatever form its config.json used;
- reading a config (a dict or a transformers config) the way transformers 5 resolves it, with its traps
  (`rope_scaling` wins over `rope_parameters`; a top-level `original_max_position_embeddings` wins over the one
  inside the rope dict; theta may live in either place; `getattr(config, "rope_theta", d)` silently returns the
  default on transformers 5, so it is never used here);
- `scaled_rope_spec`: the setting a method gives, always relative to the original pretraining length;
- our own pure-torch inverse frequencies and attention factor for every method (`rope_frequencies`), tested
  against transformers' rotary embeddings and against the published formulas (docs/rope.md);
- writing both config forms identically (`rope_parameters` for transformers 5; `rope_scaling` + `rope_theta`
  for transformers 4.x, vLLM and older tools) and `sync_rope_config_file` for a directory whose transformers 5
  `save_pretrained` wrote only `rope_parameters`.

Used by 02_rope_scale.py (plans, patches and proves the setting), hf_export.py (03's and 04's OUT/final in both
forms), 05 (addressable lengths) and 06 (keeps both forms in a merged model).

Outside this repository (copy this file and common.py): YaRN x4 on a Llama config.json,

    import json, rope
    config = json.load(open("config.json"))
    before = rope.rope_spec_from_config(config)
    original, _ = rope.original_context_length(before)          # 8192 for Llama-3.1, not its 131072
    after = rope.scaled_rope_spec(before, "yarn", original=original, factor=4, beta_fast=32, beta_slow=1)
    json.dump(rope.apply_rope_to_config(config, after), open("config.json", "w"), indent=2)
    inv_freq, attention_factor = rope.rope_frequencies(after)  # what transformers will compute from it
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common import atomic_write_text, fail

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# rope types whose config carries the pretraining length inside the rope dict (transformers standardises it)
TYPES_WITH_ORIGINAL = ("yarn", "llama3", "longrope")
# model types known to have no rotary embedding (clearer error than "no rope keys")
NON_ROTARY_MODEL_TYPES = {
    "gpt2": "learned absolute position embeddings", "gpt_bigcode": "learned absolute position embeddings",
    "opt": "learned absolute position embeddings", "bloom": "ALiBi", "mpt": "ALiBi", "bert": "absolute positions",
    "t5": "relative position buckets", "gptj": "interleaved rotary on rotary_dim (not supported here)",
}


# -------------------------------------------------------------------------------------------------------------
# One model's rotary settings.


@dataclass(frozen=True)
class RopeSpec:
    """Rotary settings as transformers 5 resolves them. Unset optional keys stay None (they are not written).

    rope_type: "default" (plain RoPE, also ABF / NTK-by-base), "linear", "dynamic", "yarn", "llama3", "longrope".
    theta: the base b. head_dim: the attention head size (for MLA models the rotary part, qk_rope_head_dim).
    partial_rotary_factor: fraction of head_dim that rotates (None = absent = 1.0).
    factor: the scale s (None for default). original_max_position_embeddings: L for yarn/llama3/longrope.
    max_position_embeddings: the config's value (dynamic NTK reads it as L).
    """

    rope_type: str = "default"
    theta: float = 10000.0
    head_dim: int = 128
    partial_rotary_factor: float | None = None
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # longrope
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    @property
    def rotary_dim(self) -> int:
        """Number of rotated channels d = int(head_dim * partial_rotary_factor) (as transformers computes it)."""
        return int(self.head_dim * (self.partial_rotary_factor if self.partial_rotary_factor is not None else 1.0))

    @property
    def scale(self) -> float:
        """The effective scale s (1.0 for plain RoPE; yarn without factor uses max / original, as transformers)."""
        if self.rope_type == "default":
            return 1.0
        if self.factor is not None:
            return float(self.factor)
        if self.original_max_position_embeddings and self.max_position_embeddings:
            return self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rotary_dim"] = self.rotary_dim
        return d

    def describe(self) -> str:
        """One line, e.g. "yarn x20 from 4096 (theta 10000, beta 32/1, mscale 1)"."""
        theta = f"theta {self.theta:g}"
        if self.rope_type == "default":
            return f"plain RoPE ({theta}, rotary dim {self.rotary_dim})"
        if self.rope_type in ("linear", "dynamic"):
            return f"{self.rope_type} x{self.scale:g} from {self.max_position_embeddings} ({theta})"
        extra = []
        if self.rope_type == "yarn":
            extra.append(f"beta {self.beta_fast or 32:g}/{self.beta_slow or 1:g}")
            for key in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, key) is not None:
                    extra.append(f"{key} {getattr(self, key):g}")
            if self.truncate is False:
                extra.append("truncate false")
        if self.rope_type == "llama3":
            extra.append(f"low/high freq factor {self.low_freq_factor:g}/{self.high_freq_factor:g}")
        return (f"{self.rope_type} x{self.scale:g} from {self.original_max_position_embeddings} "
                f"({', '.join([theta] + extra)})")


# -------------------------------------------------------------------------------------------------------------
# Reading a config: a config.json dict or a transformers config object, resolved as transformers 5 does.


def _as_dict(config: Any) -> dict:
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    fail(f"cannot read RoPE settings from a {type(config).__name__}; pass a config.json dict or a transformers config")


def default_theta_for(model_type: str | None) -> float:
    """The base transformers 5 assumes when a config names none: its config class's `default_theta` (10000
    for most families, 5e5 for Cohere, 2e6 for SmolLM3, ...), 10000 when the family is unknown."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return float(getattr(CONFIG_MAPPING[model_type], "default_theta", 10000.0))
    except Exception:  # unknown / remote-code family, or transformers missing: the RoPE paper's default
        return 10000.0


def _class_has_rope(model_type: str | None) -> bool:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
    except Exception:
        return False
    fields = getattr(cls, "__dataclass_fields__", {}) or {}
    return "rope_parameters" in fields or "rope_parameters" in getattr(cls, "__annotations__", {})


def rope_dict_of(config: Any) -> dict:
    """The rope dict transformers 5 uses: `rope_scaling` when present and non-empty (it wins over
    `rope_parameters` on load), else `rope_parameters`, else {}. Returned as a copy."""
    d = _as_dict(config)
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        fail(f"rope settings must be a JSON object, got {type(rope).__name__}")
    return dict(rope)


def has_rotary(config: Any) -> bool:
    """True when the model uses rotary position embeddings (any rope key, or a rotary family without them)."""
    d = _as_dict(config)
    if d.get("alibi"):  # Falcon-style ALiBi instead of rotary
        return False
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_emb_base", "rotary_pct", "qk_rope_head_dim")
    if any(d.get(k) is not None for k in keys):
        return True
    if d.get("model_type") in NON_ROTARY_MODEL_TYPES or d.get("position_embedding_type") in ("alibi", "absolute"):
        return False
    return _class_has_rope(d.get("model_type"))


def rope_spec_from_config(config: Any) -> RopeSpec:
    """Read the rotary settings of a config.json dict or a transformers config, from either form.

    Resolution follows transformers 5 (load + standardize + `_compute_*_parameters`):
    - `rope_scaling` (legacy) wins over `rope_parameters` when both are present and non-empty;
    - theta: inside the rope dict, else top-level `rope_theta` (or GPT-NeoX's `rotary_emb_base`), else the
      family's `default_theta` (never a silent getattr default);
    - partial_rotary_factor: inside the rope dict, else top-level (or GPT-NeoX's `rotary_pct`);
    - head_dim: `qk_rope_head_dim` (MLA), else `head_dim`, else hidden_size // num_attention_heads;
    - original_max_position_embeddings (yarn/llama3/longrope): a TOP-LEVEL value wins over the one in the rope
      dict (transformers applies it in place when the rotary embedding is built), else the dict's, else
      max_position_embeddings; `type` is accepted for `rope_type`.
    Fails with one clear line for a model without rotary embeddings or with per-layer-type RoPE.
    """
    d = _as_dict(config)
    model_type = d.get("model_type")
    if not has_rotary(d):
        why = NON_ROTARY_MODEL_TYPES.get(model_type, "no rope_theta / rope_parameters / rope_scaling in config.json")
        fail(f"model type {model_type or 'unknown'} has no rotary position embeddings ({why}); 02 patches RoPE "
             f"models only (Llama, Qwen2, Mistral, ...)")
    rope = rope_dict_of(d)
    layer_types = set(d.get("layer_types") or []) | {"full_attention", "sliding_attention"}
    if any(k in layer_types and isinstance(v, dict) for k, v in rope.items()):
        fail(f"{model_type} has per-layer-type RoPE ({', '.join(sorted(k for k in rope if k in layer_types))}); "
             f"02 supports one global rope setting only")
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_TYPES:
        fail(f"rope_type {kind!r} is not supported (known: {', '.join(ROPE_TYPES)})")
    theta = rope.get("rope_theta")
    if theta is None:
        theta = d.get("rope_theta", d.get("rotary_emb_base"))
    if theta is None:
        theta = default_theta_for(model_type)
    prf = rope.get("partial_rotary_factor")
    if prf is None:
        prf = d.get("partial_rotary_factor", d.get("rotary_pct"))
    head_dim = d.get("qk_rope_head_dim") or d.get("head_dim")
    if not head_dim:
        if not d.get("hidden_size") or not d.get("num_attention_heads"):
            fail("config.json has neither head_dim nor hidden_size / num_attention_heads; cannot size the RoPE")
        head_dim = d["hidden_size"] // d["num_attention_heads"]
    max_pos = d.get("max_position_embeddings")
    original = None
    if kind in TYPES_WITH_ORIGINAL:
        original = d.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
            or max_pos
    factor = rope.get("factor")
    if kind in ("linear", "dynamic", "llama3") and factor is None:
        fail(f"{kind} RoPE without a factor in the rope config; the config is incomplete")

    def opt(key, cast=float):
        value = rope.get(key)
        return None if value is None else cast(value)

    return RopeSpec(
        rope_type=kind, theta=float(theta), head_dim=int(head_dim),
        partial_rotary_factor=None if prf is None else float(prf),
        factor=None if factor is None or kind == "default" else float(factor),
        original_max_position_embeddings=None if original is None else int(original),
        max_position_embeddings=None if max_pos is None else int(max_pos),
        beta_fast=opt("beta_fast"), beta_slow=opt("beta_slow"), mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"), attention_factor=opt("attention_factor"),
        truncate=opt("truncate", bool), low_freq_factor=opt("low_freq_factor"),
        high_freq_factor=opt("high_freq_factor"),
        short_factor=None if rope.get("short_factor") is None else tuple(map(float, rope["short_factor"])),
        long_factor=None if rope.get("long_factor") is None else tuple(map(float, rope["long_factor"])),
    )


# rope types that keep max_position_embeddings at the ORIGINAL length: transformers' dynamic NTK reads it as the
# pretraining length, and vLLM derives the usable length as max_position_embeddings * factor for both
TYPES_KEEPING_MAX_AT_ORIGINAL = ("linear", "dynamic")
# model families whose attention multiplies the softmax scale by get_mscale(factor, mscale_all_dim)^2 on top of
# the cos/sin attention_factor (DeepSeek-V2/V3 style MLA attention in transformers 5)
MSCALE_ALL_DIM_IN_ATTENTION = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                               "longcat_flash", "minicpm3", "mistral4", "mistral_large4", "youtu", "kimi_k2")


# -------------------------------------------------------------------------------------------------------------
# Lengths: the original pretraining length a rope setting is relative to, and what it addresses.


def original_context_length(spec: RopeSpec) -> tuple[int, str]:
    """(L, why): the pretraining length a (possibly already scaled) model's rope is relative to.

    - yarn / llama3 / longrope: original_max_position_embeddings (Llama-3.1: 8192, not 131072: UltraLong's
      factor 128 for 1M is relative to it);
    - linear / dynamic: max_position_embeddings (transformers' dynamic NTK and vLLM read it as the original
      length; 02 writes these types that way);
    - plain RoPE (incl. a theta change): max_position_embeddings, the length the current base was trained for.
    """
    if spec.rope_type in TYPES_WITH_ORIGINAL:
        return scaling_original(spec), f"original_max_position_embeddings of its {spec.rope_type} scaling"
    if not spec.max_position_embeddings:
        fail("config.json has no max_position_embeddings; pass --original-len")
    if spec.rope_type in TYPES_KEEPING_MAX_AT_ORIGINAL:
        return spec.max_position_embeddings, (f"max_position_embeddings (the original length for {spec.rope_type} "
                                              f"scaling, as transformers' dynamic NTK and vLLM read it)")
    return spec.max_position_embeddings, "max_position_embeddings (plain RoPE)"


def addressable_length(spec: RopeSpec) -> int | None:
    """The context length a rope setting claims to address: factor x max_position_embeddings for linear /
    dynamic (which keep max_position_embeddings at the original length; vLLM's rule), otherwise
    max_position_embeddings (Llama-3.1: 131072 with llama3 x8 from 8192; AFM: 65536 with yarn x20 from 4096),
    or factor x original when the config has no max_position_embeddings."""
    if spec.rope_type in TYPES_KEEPING_MAX_AT_ORIGINAL and spec.max_position_embeddings:
        return int(round(spec.scale * spec.max_position_embeddings))
    if spec.max_position_embeddings:
        return spec.max_position_embeddings
    if spec.rope_type == "default":
        return None
    return int(round(spec.scale * original_context_length(spec)[0]))


# -------------------------------------------------------------------------------------------------------------
# Frequencies: our own implementation of every method's inverse frequencies and attention factor. Every function
# returns float64 tensors of length d/2. Notation (docs/rope.md#notation): rotary dim d (pairs i = 0 .. d/2-1), base b,
# theta_i = b^(-2i/d), wavelength lambda_i = 2*pi/theta_i, original length L, scale s. YaRN uses the released
# code's ramp, linear in the pair INDEX between floor(dim_at(beta_fast)) and ceil(dim_at(beta_slow)), which every
# YaRN checkpoint was trained with, not the paper's eq. 18 (linear in rotations) [docs/rope.md#yarn].


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Plain RoPE: theta_i = b^(-2i/d)."""
    if dim <= 0 or dim % 2:
        fail(f"rotary dimension {dim} must be a positive even number")
    return 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """lambda_i = 2*pi / theta_i: tokens per full rotation of pair i."""
    return 2 * math.pi / inv_freq


def ntk_theta(theta: float, factor: float, dim: int) -> float:
    """Static NTK-aware base: b' = b * s^(d/(d-2)) [docs/rope.md#ntk-aware-dynamic-ntk-and-abf], written as a
    plain theta change."""
    return float(theta) * float(factor) ** (dim / (dim - 2))


def dynamic_ntk_theta(theta: float, factor: float, dim: int, seq_len: int, max_position_embeddings: int) -> float:
    """Dynamic NTK base at sequence length l (transformers `_compute_dynamic_ntk_parameters`):
    b' = b * ((s * l / L) - (s - 1))^(d/(d-2)) with l = max(l, L), L = config.max_position_embeddings."""
    seq_len = max(int(seq_len), int(max_position_embeddings))
    return float(theta) * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_dim(num_rotations: float, dim: int, theta: float, original: int) -> float:
    """dim_at(rot) = d * ln(L / (rot * 2 pi)) / (2 ln b): the (fractional) pair index that makes `rot`
    rotations over the original length L."""
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))


def yarn_band_edges(dim: int, theta: float, original: int, beta_fast: float | None = None,
                    beta_slow: float | None = None, truncate: bool | None = None) -> tuple[float, float]:
    """(low, high) pair indices of the YaRN ramp, exactly as the released code / transformers compute them:
    low = floor(dim_at(beta_fast)), high = ceil(dim_at(beta_slow)) (no rounding when truncate is False),
    clamped to [0, d - 1]. Pairs <= low keep their frequency (extrapolated), pairs >= high are divided by s
    (interpolated), pairs in between are blended linearly in the index."""
    beta_fast = beta_fast or 32  # transformers: `get("beta_fast") or 32`
    beta_slow = beta_slow or 1
    low = yarn_correction_dim(beta_fast, dim, theta, original)
    high = yarn_correction_dim(beta_slow, dim, theta, original)
    if truncate is None or truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, n_pairs: int) -> torch.Tensor:
    """Released-code ramp, linear in the pair index: clamp((i - low) / (high - low), 0, 1); 0 = keep, 1 = /s."""
    if low == high:
        high += 0.001  # the reference code's guard against a zero-width ramp
    return torch.clamp((torch.arange(n_pairs, dtype=torch.float64) - low) / (high - low), 0, 1)


def yarn_attention_factor(factor: float, attention_factor: float | None = None, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
    """The cos/sin multiplier of YaRN (q.k logits scale by its square), as transformers computes it:
    explicit attention_factor, else get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) when both are set
    (and non-zero), else 0.1 ln s + 1."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
    return yarn_get_mscale(factor)


def yarn_inv_freq(spec: RopeSpec) -> torch.Tensor:
    """YaRN ("NTK-by-parts" with the index ramp): theta'_i = theta_i/s * ramp_i + theta_i * (1 - ramp_i)."""
    dim = spec.rotary_dim
    extrapolation = base_inv_freq(spec.theta, dim)
    interpolation = extrapolation / spec.scale
    low, high = yarn_band_edges(dim, spec.theta, scaling_original(spec), spec.beta_fast, spec.beta_slow, spec.truncate)
    ramp = yarn_ramp(low, high, dim // 2)
    return interpolation * ramp + extrapolation * (1 - ramp)


def llama3_inv_freq(spec: RopeSpec) -> torch.Tensor:
    """Llama-3.1 RoPE [docs/rope.md#llama-3-rope]: wavelengths below L/high_freq_factor kept, above L/low_freq_factor
    divided by s, smooth blend in between with sm = (L/lambda - low) / (high - low)."""
    inv_freq = base_inv_freq(spec.theta, spec.rotary_dim)
    factor, low_ff, high_ff = spec.scale, spec.low_freq_factor, spec.high_freq_factor
    if low_ff is None or high_ff is None:
        fail("llama3 RoPE needs low_freq_factor and high_freq_factor in the rope config")
    original = scaling_original(spec)
    low_wavelen, high_wavelen = original / low_ff, original / high_ff
    wavelen = wavelengths(inv_freq)
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def rope_frequencies(spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [d/2] float64, attention_factor) for any rope type, as the model computes them.

    `seq_len` matters only for dynamic NTK (the running length) and longrope (short vs long factors); None
    means the model's initial state, as transformers builds it.
    Note: transformers' Llama-family default RoPE ignores partial_rotary_factor (it rotates the whole head);
    here it is honoured, as in every scaled type and in the families that support partial rotation.
    """
    kind, dim = spec.rope_type, spec.rotary_dim
    if kind == "default":
        return base_inv_freq(spec.theta, dim), 1.0
    if kind == "linear":
        return base_inv_freq(spec.theta, dim) / spec.scale, 1.0
    if kind == "dynamic":
        if not spec.max_position_embeddings:
            fail("dynamic NTK needs max_position_embeddings (the original length) in the config")
        theta = dynamic_ntk_theta(spec.theta, spec.scale, dim, seq_len or spec.max_position_embeddings,
                                  spec.max_position_embeddings)
        return base_inv_freq(theta, dim), 1.0
    if kind == "yarn":
        return yarn_inv_freq(spec), yarn_attention_factor(spec.scale, spec.attention_factor, spec.mscale,
                                                          spec.mscale_all_dim)
    if kind == "llama3":
        return llama3_inv_freq(spec), 1.0
    if kind == "longrope":
        return _longrope(spec, seq_len)
    fail(f"rope_type {kind!r} is not supported (known: {', '.join(ROPE_TYPES)})")


def _longrope(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    original = scaling_original(spec)
    factor = spec.factor if spec.factor is not None else spec.max_position_embeddings / original
    if spec.attention_factor is not None:
        attention = float(spec.attention_factor)
    else:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = spec.long_factor if seq_len and seq_len > original else spec.short_factor
    ext = torch.tensor(ext, dtype=torch.float64)
    return base_inv_freq(spec.theta, spec.rotary_dim) / ext, attention


def scaling_original(spec: RopeSpec) -> int:
    original = spec.original_max_position_embeddings or spec.max_position_embeddings
    if not original:
        fail(f"{spec.rope_type} RoPE needs original_max_position_embeddings (or max_position_embeddings)")
    return int(original)


def attention_logit_scale(spec: RopeSpec, model_type: str | None = None) -> dict:
    """The effective attention temperature of a rope setting in a given architecture.

    cos/sin are multiplied by attention_factor, so q.k logits scale by attention_factor^2; DeepSeek-style MLA
    attention additionally multiplies the softmax scale by get_mscale(s, mscale_all_dim)^2 when mscale_all_dim
    is set [docs/rope.md#yarn]. Returns attention_factor, extra_softmax_scale, logit_multiplier and the YaRN
    temperature t = 1 / logit_multiplier (softmax(q.k / (t sqrt(d))))."""
    _, attention_factor = rope_frequencies(spec)
    extra = 1.0
    if spec.rope_type != "default" and model_type in MSCALE_ALL_DIM_IN_ATTENTION and spec.mscale_all_dim:
        extra = yarn_get_mscale(spec.scale, spec.mscale_all_dim) ** 2
    multiplier = attention_factor ** 2 * extra
    return {"attention_factor": attention_factor, "extra_softmax_scale": extra, "logit_multiplier": multiplier,
            "temperature": 1.0 / multiplier}


# -------------------------------------------------------------------------------------------------------------
# The new setting: what each method gives, relative to the original pretraining length.


def scaled_rope_spec(before: RopeSpec, method: str, *, original: int, factor: float | None = None,
                     target_len: int | None = None, theta: float | None = None, **options) -> RopeSpec:
    """The rope setting `method` gives a model whose current setting is `before` (pure; no files).

    method: "yarn", "linear", "ntk" (static NTK: a plain theta change b * s^(d/(d-2))), "dynamic", "llama3"
    (keeps an existing llama3 scaling's low/high frequency factors, else Meta's 1 / 4), "theta" (plain RoPE
    with base `theta`). The factor is always relative to `original`, the ORIGINAL pretraining length (an
    existing scaling is replaced, not multiplied); it defaults to target_len / original. `theta` overrides
    the base for any method. `options`: beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor,
    truncate (yarn), low_freq_factor, high_freq_factor (llama3).
    The returned spec's max_position_embeddings is what the config should hold: target_len (or
    factor x original), except linear / dynamic, which keep the original (see TYPES_KEEPING_MAX_AT_ORIGINAL).
    """
    if factor is None and target_len is not None:
        factor = target_len / original
    base = float(theta) if theta is not None else before.theta
    shared = dict(theta=base, head_dim=before.head_dim, partial_rotary_factor=before.partial_rotary_factor)
    if method == "theta":
        return RopeSpec(rope_type="default",
                               max_position_embeddings=int(target_len or before.max_position_embeddings), **shared)
    if factor is None:
        fail(f"--method {method} needs --factor or --target-len")
    if factor < 1:
        fail(f"factor {factor:g} < 1 would shrink the context; give a factor >= 1 (or a target >= {original})")
    target = int(target_len) if target_len is not None else int(round(factor * original))
    if method == "ntk":
        shared["theta"] = ntk_theta(base, factor, before.rotary_dim)
        return RopeSpec(rope_type="default", max_position_embeddings=target, **shared)
    if method in ("linear", "dynamic"):
        return RopeSpec(rope_type=method, factor=float(factor), max_position_embeddings=int(original), **shared)
    if method == "yarn":
        keys = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")
        return RopeSpec(rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
                               max_position_embeddings=target, **shared,
                               **{k: options.get(k) for k in keys if options.get(k) is not None})
    if method == "llama3":
        low = options.get("low_freq_factor") or before.low_freq_factor or 1.0
        high = options.get("high_freq_factor") or before.high_freq_factor or 4.0
        return RopeSpec(rope_type="llama3", factor=float(factor),
                               original_max_position_embeddings=int(original), max_position_embeddings=target,
                               low_freq_factor=float(low), high_freq_factor=float(high), **shared)
    fail(f"unknown method {method!r}; choose yarn, theta, linear, ntk, dynamic or llama3")


# -------------------------------------------------------------------------------------------------------------
# Writing both config forms identically.

_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor", "attention_factor"),
}


def legacy_rope_scaling(spec: RopeSpec) -> dict | None:
    """The transformers 4.x / vLLM `rope_scaling` dict (None for plain RoPE); theta goes to top-level
    `rope_theta`. Only keys that are set are written."""
    if spec.rope_type == "default":
        return None
    out = {"rope_type": spec.rope_type}
    for key in _SCALING_KEYS[spec.rope_type]:
        value = getattr(spec, key)
        if value is None:
            continue
        if key == "original_max_position_embeddings":
            value = int(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def rope_parameters_dict(spec: RopeSpec) -> dict:
    """The transformers 5 `rope_parameters` dict: the legacy dict plus rope_theta (and partial_rotary_factor)."""
    out = legacy_rope_scaling(spec) or {"rope_type": "default"}
    out["rope_theta"] = float(spec.theta)
    if spec.partial_rotary_factor is not None:
        out["partial_rotary_factor"] = float(spec.partial_rotary_factor)
    return out


def apply_rope_to_config(config: dict, spec: RopeSpec) -> dict:
    """A copy of a config.json dict with `spec` written in both forms, identically:
    `rope_parameters` (transformers 5), `rope_scaling` + `rope_theta` (+ `partial_rotary_factor`) for 4.x /
    vLLM, `max_position_embeddings` from the spec, and a top-level `original_max_position_embeddings` (which
    would override the rope dict's on transformers 5) kept equal to the spec's when the config has one.
    GPT-NeoX's aliases (`rotary_emb_base`, `rotary_pct`) are kept consistent when present."""
    out = dict(config)
    out["rope_parameters"] = rope_parameters_dict(spec)
    out["rope_scaling"] = legacy_rope_scaling(spec)
    out["rope_theta"] = float(spec.theta)
    if spec.partial_rotary_factor is not None:
        out["partial_rotary_factor"] = float(spec.partial_rotary_factor)
        if "rotary_pct" in out:
            out["rotary_pct"] = float(spec.partial_rotary_factor)
    if "rotary_emb_base" in out:
        out["rotary_emb_base"] = float(spec.theta)
    if "original_max_position_embeddings" in out and spec.original_max_position_embeddings is not None:
        out["original_max_position_embeddings"] = int(spec.original_max_position_embeddings)
    if spec.max_position_embeddings is not None:
        out["max_position_embeddings"] = int(spec.max_position_embeddings)
    return out


def both_forms(config: dict) -> dict:
    """A config.json dict with its own rope settings written in both forms (a model without rotary embeddings
    comes back as it is). transformers 5's save_pretrained writes only `rope_parameters`, and 4.x readers then
    silently lose YaRN and the base: every stage that writes a model passes its config.json through this."""
    return apply_rope_to_config(config, rope_spec_from_config(config)) if has_rotary(config) else config


def sync_rope_config_file(model_dir: str | os.PathLike) -> None:
    """Rewrite `model_dir/config.json` with its rope settings in both forms (see both_forms)."""
    path = Path(model_dir) / "config.json"
    atomic_write_text(path, json.dumps(both_forms(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")
