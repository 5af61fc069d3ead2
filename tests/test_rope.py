"""02_rope_scale.py (frequencies, presets, reports) and the config reader / writer in rope.py: RoPE frequencies
proven three ways.

1. Our inverse frequencies and attention factor equal transformers' own rope initialisation
   (`ROPE_INIT_FUNCTIONS`, or the family's default-RoPE function) to 1e-6 relative on the published settings.
2. They equal a YaRN / llama3 reference written independently below from docs/rope.md#yarn and #llama-3-rope
   (band edges as in its worked table; the paper's eq. 18 ramp differs as much as docs/rope.md#paper-form says).
3. Both config forms read alike: transformers 5 reading the whole file, `rope_parameters` only, `rope_scaling` +
   `rope_theta` only, and an independent legacy-key reader (transformers >= 4.56 / vLLM semantics) all compute
   the same frequencies for every preset.
Then the script end to end: reload with identical logits, forward at 4x the original length, the real
SmolLM2-135M keeps its perplexity under YaRN x4, and bad input is refused with one line and no output.
"""
import hashlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import common
import rope
from lc_testutil import load_script

scale = load_script("02_rope_scale")

RTOL = 1e-6

# -------------------------------------------------------------------------------------------------------------
# Real model configurations (architecture keys only; the rope part is what the tests vary).

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=64, num_hidden_layers=1, vocab_size=128, max_position_embeddings=8192,
                 rope_theta=500000.0)
LLAMA31_8B = dict(LLAMA3_8B, max_position_embeddings=131072,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
AFM_4K = dict(model_type="arcee", hidden_size=2560, num_attention_heads=20, num_key_value_heads=4, head_dim=128,
              intermediate_size=64, num_hidden_layers=1, vocab_size=128, max_position_embeddings=4096,
              rope_theta=10000.0)
AFM_SHIPPED = dict(AFM_4K, max_position_embeddings=65536,
                   rope_scaling={"rope_type": "yarn", "factor": 20.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0})
DSV3 = dict(model_type="deepseek_v3", hidden_size=7168, num_attention_heads=128, num_key_value_heads=128,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=512, q_lora_rank=1536,
            intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_hidden_layers=1, vocab_size=128,
            max_position_embeddings=163840, rope_theta=10000.0,
            rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=64, num_hidden_layers=1, vocab_size=128, max_position_embeddings=32768,
                 rope_theta=1000000.0,
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})


def with_rope(base: dict, **rope_scaling) -> dict:
    out = dict(base)
    out["rope_scaling"] = rope_scaling
    return out


def ultralong(factor: int) -> dict:  # UltraLong on Llama-3.1-8B: yarn relative to its original 8192
    return dict(LLAMA3_8B, max_position_embeddings=8192 * factor,
                rope_scaling={"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": 8192,
                              "beta_fast": 4.0, "beta_slow": 1.0})


PUBLISHED = {
    "afm-4k-to-64k": AFM_SHIPPED,
    "deepseek-v3-factor-40": DSV3,
    "ultralong-1m": ultralong(128),
    "ultralong-2m": ultralong(256),
    "ultralong-4m": ultralong(512),
    "prolong-theta-8e6": dict(LLAMA3_8B, rope_theta=8e6, max_position_embeddings=65536),
    "prolong-theta-1.28e8": dict(LLAMA3_8B, rope_theta=1.28e8, max_position_embeddings=524288),
    "qwen2.5-yarn-4": QWEN25_7B,
    "llama-3.1-llama3": LLAMA31_8B,
    "linear-4": with_rope(LLAMA3_8B, rope_type="linear", factor=4.0),
    "ntk-8": dict(LLAMA3_8B, rope_theta=rope.ntk_theta(5e5, 8.0, 128), max_position_embeddings=65536),
    "dynamic-4": with_rope(LLAMA3_8B, rope_type="dynamic", factor=4.0),
}


def hf_config(d: dict):
    from transformers import AutoConfig

    d = json.loads(json.dumps(d))  # deep copy: transformers edits rope dicts in place
    return AutoConfig.for_model(d.pop("model_type"), **d)


def hf_frequencies(d: dict, seq_len=None):
    """transformers' own rope initialisation for a config dict: ROPE_INIT_FUNCTIONS[rope_type], or the family's
    `compute_default_rope_parameters` for plain RoPE."""
    import importlib

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(d)
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        rotary = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
        inv_freq, factor = rotary.compute_default_rope_parameters(config)
    else:
        kwargs = {} if seq_len is None else {"seq_len": seq_len}
        inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](config, None, **kwargs)
    return inv_freq.double(), float(factor)


def read_spec(model_dir) -> rope.RopeSpec:
    return rope.rope_spec_from_config(json.loads((Path(model_dir) / "config.json").read_text()))


def assert_rel(a, b, rtol=RTOL):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    rel = ((a - b).abs() / b.abs()).max().item()
    assert rel <= rtol, f"max relative difference {rel:.3e} > {rtol}"


# -------------------------------------------------------------------------------------------------------------
# Independent references, written from docs/rope.md#yarn / #llama-3-rope (not from 02_rope_scale.py).


def reference_yarn(d, b, L, s, beta_fast=32, beta_slow=1, mscale=None, mscale_all_dim=None, attention_factor=None):
    """docs/rope.md#hf-implementation: the released code's ramp, linear in the pair index."""
    def dim_at(rot):
        return d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(b))

    low, high = math.floor(dim_at(beta_fast)), math.ceil(dim_at(beta_slow))
    low, high = max(low, 0), min(high, d - 1)
    inv = []
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrap_w = 1 - ramp
        inv.append((1 / (s * b ** (2 * i / d))) * (1 - extrap_w) + (1 / b ** (2 * i / d)) * extrap_w)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1

    if attention_factor is None:
        attention_factor = (get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) if mscale and mscale_all_dim
                            else get_mscale(s))
    return torch.tensor(inv, dtype=torch.float64), attention_factor, (low, high)


def paper_yarn(d, b, L, s, alpha=1, beta=32):
    """The paper's eq. 18 ramp, linear in r = L / lambda (docs/rope.md#paper-form): NOT what checkpoints use."""
    inv = []
    for i in range(d // 2):
        theta = b ** (-2 * i / d)
        r = L / (2 * math.pi / theta)
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        inv.append((1 - gamma) * theta / s + gamma * theta)
    return torch.tensor(inv, dtype=torch.float64)


def reference_llama3(d, b, L, s, low_ff, high_ff):
    """docs/rope.md#llama-3-rope."""
    inv = []
    for i in range(d // 2):
        theta = b ** (-2 * i / d)
        wl = 2 * math.pi / theta
        if wl < L / high_ff:
            inv.append(theta)
        elif wl > L / low_ff:
            inv.append(theta / s)
        else:
            sm = (L / wl - low_ff) / (high_ff - low_ff)
            inv.append((1 - sm) * theta / s + sm * theta)
    return torch.tensor(inv, dtype=torch.float64)


def legacy_reader(cfg: dict):
    """Reads ONLY the legacy keys, as transformers >= 4.56 and vLLM do: `rope_scaling` (`rope_type` or `type`),
    top-level `rope_theta` (default 10000) and `partial_rotary_factor`; `rope_parameters` is invisible to it."""
    theta = cfg.get("rope_theta", 10000.0)
    head_dim = cfg.get("qk_rope_head_dim") or cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    d = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    plain = torch.tensor([1 / theta ** (2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    if kind == "default":
        return plain, 1.0
    if kind in ("linear",):
        return plain / rs["factor"], 1.0
    if kind == "dynamic":  # at load time (seq_len <= max_position_embeddings) dynamic NTK is plain RoPE
        return plain, 1.0
    original = rs.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    if kind == "yarn":
        inv, af, _ = reference_yarn(d, theta, original, rs["factor"], rs.get("beta_fast") or 32,
                                    rs.get("beta_slow") or 1, rs.get("mscale"), rs.get("mscale_all_dim"),
                                    rs.get("attention_factor"))
        return inv, af
    if kind == "llama3":
        return reference_llama3(d, theta, original, rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]), 1.0
    raise AssertionError(f"legacy reader does not know {kind}")


# -------------------------------------------------------------------------------------------------------------
# 1. Ours == transformers' own rope initialisation.


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_inv_freq_and_attention_factor_match_transformers(name):
    cfg = PUBLISHED[name]
    spec = rope.rope_spec_from_config(cfg)
    lengths = [None]
    if spec.rope_type == "dynamic":  # dynamic NTK at two running lengths past the original 8192
        lengths += [16384, 65536]
    for seq_len in lengths:
        ours, our_factor = rope.rope_frequencies(spec, seq_len)
        theirs, their_factor = hf_frequencies(cfg, seq_len)
        assert_rel(ours, theirs)
        assert our_factor == pytest.approx(their_factor, rel=RTOL)
    if spec.rope_type == "dynamic":  # and it really changed with the length
        assert not torch.allclose(rope.rope_frequencies(spec, 65536)[0], rope.rope_frequencies(spec)[0])


def test_transformers_config_objects_read_like_dicts():
    for name in ("afm-4k-to-64k", "deepseek-v3-factor-40", "llama-3.1-llama3", "qwen2.5-yarn-4"):
        a = rope.rope_frequencies(rope.rope_spec_from_config(PUBLISHED[name]))[0]
        b = rope.rope_frequencies(rope.rope_spec_from_config(hf_config(PUBLISHED[name])))[0]
        assert_rel(a, b, 1e-12)


def yarn_mscale(s: float, m: float = 1.0) -> float:
    """YaRN's temperature (docs/rope.md#yarn): sqrt(1/t) = 0.1 m ln s + 1, and 1 for s <= 1."""
    return 0.1 * m * math.log(s) + 1 if s > 1 else 1.0


def test_ntk_rule_and_attention_temperatures():
    # ProLong's "dynamic NTK suggests" bases: b' = b s^(d/(d-2)) (docs/rope.md#ntk-aware-dynamic-ntk-and-abf)
    for theta, s in ((5e5, 8), (8e6, 8)):
        assert rope.ntk_theta(theta, s, 128) == pytest.approx(theta * s ** (128 / 126), rel=1e-12)
    assert 5e5 * 8 ** (128 / 126) == pytest.approx(4.13e6, rel=2e-3)  # as the doc prints them
    assert 8e6 * 8 ** (128 / 126) == pytest.approx(6.6e7, rel=5e-3)
    # YaRN temperatures: cos and sin x sqrt(1/t), so q.k logits x (1/t) (docs/recipes.md#arcee-published-facts)
    afm = rope.attention_logit_scale(rope.rope_spec_from_config(AFM_SHIPPED), "arcee")
    assert afm["attention_factor"] == pytest.approx(yarn_mscale(20), rel=1e-12)
    assert afm["logit_multiplier"] == pytest.approx(yarn_mscale(20) ** 2, rel=1e-12)
    assert (yarn_mscale(20), yarn_mscale(20) ** 2) == (pytest.approx(1.2996, abs=1e-4), pytest.approx(1.689, abs=1e-3))
    for factor, printed in ((128, 1.485), (256, 1.555), (512, 1.624)):  # docs/recipes.md#ultralong-recipe
        spec = rope.rope_spec_from_config(ultralong(factor))
        assert rope.rope_frequencies(spec)[1] == pytest.approx(yarn_mscale(factor), rel=1e-12)
        assert yarn_mscale(factor) == pytest.approx(printed, abs=1e-3)
    # DeepSeek-V3's rope_scaling (mscale = mscale_all_dim = 1): cos/sin x mscale(40, 1) / mscale(40, 1) = 1, and
    # DeepSeek's own attention scales the softmax by mscale(40, 1)^2; a Llama-architecture model copying the same
    # rope_scaling does not.
    dsv3 = rope.rope_spec_from_config(DSV3)
    assert rope.attention_logit_scale(dsv3, "deepseek_v3")["logit_multiplier"] == pytest.approx(
        yarn_mscale(40, 1.0) ** 2, rel=1e-12)
    assert yarn_mscale(40, 1.0) ** 2 == pytest.approx(1.874, abs=1e-3)
    assert rope.attention_logit_scale(dsv3, "llama")["logit_multiplier"] == 1.0
    # mscale_all_dim without mscale: cos/sin take the default temperature mscale(40), and the softmax still
    # mscale(40, 1)^2: logits x mscale(40)^4 (3.51)
    only_all_dim = replace(dsv3, mscale=None)
    assert rope.attention_logit_scale(only_all_dim, "deepseek_v3")["logit_multiplier"] == pytest.approx(
        yarn_mscale(40) ** 2 * yarn_mscale(40, 1.0) ** 2, rel=1e-12)


def test_deepseek_temperature_matches_transformers_attention():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    small = dict(DSV3, hidden_size=256, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32,
                 q_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32)  # same rope, small projections
    config = hf_config(small)
    config._attn_implementation = "eager"
    attention = DeepseekV3Attention(config, layer_idx=0)
    extra = attention.scaling / config.qk_head_dim ** -0.5
    assert extra == pytest.approx(rope.attention_logit_scale(rope.rope_spec_from_config(DSV3),
                                                             "deepseek_v3")["extra_softmax_scale"], rel=1e-9)


# -------------------------------------------------------------------------------------------------------------
# 2. Ours == the YaRN reference formula; band edges as docs/rope.md#worked-band-edges; eq. 18 differs.

YARN_CASES = {  # name: (config, band edges from docs/rope.md#worked-band-edges or None, its name in #paper-form)
    "afm-4k-to-64k": (AFM_SHIPPED, (20, 46), "AFM"),
    "ultralong-1m": (ultralong(128), (28, 35), "UltraLong"),
    "ultralong-2m": (ultralong(256), (28, 35), None),
    "ultralong-4m": (ultralong(512), (28, 35), None),
    "deepseek-v3-factor-40": (DSV3, (10, 23), "DeepSeek-V3"),
    "qwen2.5-yarn-4": (QWEN25_7B, None, "Qwen2.5"),
}


def paper_form_gaps() -> dict:
    """docs/rope.md#paper-form's figures: {name: (percent apart, pair)}, e.g. "70% apart (AFM, pair 39)"."""
    text = " ".join((Path(__file__).resolve().parent.parent / "docs" / "rope.md").read_text().split())
    found = re.findall(r"(\d+)% (?:apart )?\(([\w.-]+), pair (\d+)\)", text)
    return {name: (int(percent), int(pair)) for percent, name, pair in found}


@pytest.mark.parametrize("name", sorted(YARN_CASES))
def test_yarn_matches_reference_and_band_edges(name):
    cfg, edges, paper_name = YARN_CASES[name]
    spec = rope.rope_spec_from_config(cfg)
    rs = cfg["rope_scaling"]
    inv, factor, (low, high) = reference_yarn(spec.rotary_dim, cfg["rope_theta"],
                                              rs["original_max_position_embeddings"], rs["factor"],
                                              rs.get("beta_fast") or 32, rs.get("beta_slow") or 1, rs.get("mscale"),
                                              rs.get("mscale_all_dim"))
    ours, our_factor = rope.rope_frequencies(spec)
    assert_rel(ours, inv, 1e-12)
    assert our_factor == pytest.approx(factor, rel=1e-12)
    bands = scale.yarn_bands(spec)
    assert (bands["low"], bands["high"]) == (low, high)
    if edges is not None:
        assert (low, high) == edges
    # The paper's eq. 18 ramp (linear in rotations) is a different function. Outside the band both keep the high
    # frequencies and interpolate the low ones, so they differ inside it only, by what docs/rope.md#paper-form says.
    if paper_name is not None:
        paper = paper_yarn(spec.rotary_dim, cfg["rope_theta"], rs["original_max_position_embeddings"], rs["factor"],
                           rs.get("beta_slow") or 1, rs.get("beta_fast") or 32)
        rel = (paper - inv).abs() / inv
        outside = [i for i in range(len(inv)) if not low <= i <= high]
        assert rel[outside].max().item() < 1e-12
        assert (round(100 * rel.max().item()), int(rel.argmax())) == paper_form_gaps()[paper_name]


def test_llama3_matches_reference():
    ours, factor = rope.rope_frequencies(rope.rope_spec_from_config(LLAMA31_8B))
    assert_rel(ours, reference_llama3(128, 5e5, 8192, 8.0, 1.0, 4.0), 1e-12)
    assert factor == 1.0


def test_ultralong_band_edges_equal_llama3_band():
    """docs/rope.md#same-band-as-llama3: beta 4/1 from 8K puts the YaRN ramp on the same wavelengths
    (2048-8192) as llama3 1/4."""
    bands = scale.yarn_bands(rope.rope_spec_from_config(ultralong(128)))
    wl = rope.wavelengths(rope.base_inv_freq(5e5, 128))
    assert wl[bands["low"]] <= 2048 <= wl[bands["low"] + 1] and wl[bands["high"] - 1] <= 8192 <= wl[bands["high"]]


# -------------------------------------------------------------------------------------------------------------
# 3. Both config forms written and read back alike, for every preset.

PRESET_BASES = {"prolong-64k": LLAMA3_8B, "ultralong-1m": LLAMA31_8B, "ultralong-2m": LLAMA31_8B,
                "ultralong-4m": LLAMA31_8B, "afm-64k": AFM_4K, "dsv3-yarn": AFM_4K}
PRESET_EXPECT = {  # published values the written config must carry
    "prolong-64k": dict(rope_type="default", rope_theta=8e6, max_position_embeddings=65536),
    "prolong-512k": dict(rope_type="default", rope_theta=1.28e8, max_position_embeddings=524288),
    "ultralong-1m": dict(rope_type="yarn", factor=128.0, original=8192, max_position_embeddings=1048576,
                         beta_fast=4.0, beta_slow=1.0, rope_theta=5e5),
    "ultralong-2m": dict(rope_type="yarn", factor=256.0, original=8192, max_position_embeddings=2097152),
    "ultralong-4m": dict(rope_type="yarn", factor=512.0, original=8192, max_position_embeddings=4194304),
    "afm-64k": dict(rope_type="yarn", factor=20.0, original=4096, max_position_embeddings=65536, beta_fast=32.0,
                    beta_slow=1.0, mscale=1.0, rope_theta=1e4),
    "dsv3-yarn": dict(rope_type="yarn", factor=40.0, original=4096, max_position_embeddings=163840, mscale=1.0,
                      mscale_all_dim=1.0),
}


def plan_config(base: dict, argv: list[str]) -> tuple[dict, rope.RopeSpec, list[str], list[str]]:
    """What 02 writes for `base` with these flags (no files): (config, after spec, notes, warnings)."""
    args = scale.parse_args(["--model", "unused", "--dry-run"] + argv)
    preset = scale.apply_preset(args)
    before = rope.rope_spec_from_config(base)
    after, _, notes, warnings = scale.plan_rope(args, before, base["model_type"], preset)
    return rope.apply_rope_to_config(base, after), after, notes, warnings


def preset_config(name: str) -> tuple[dict, rope.RopeSpec]:
    if name == "prolong-512k":  # the second ProLong stage patches the 64K model
        base = plan_config(LLAMA3_8B, ["--preset", "prolong-64k"])[0]
    else:
        base = PRESET_BASES[name]
    config, after, _, _ = plan_config(base, ["--preset", name])
    return config, after


@pytest.mark.parametrize("name", sorted(scale.ROPE_PRESETS))
def test_every_preset_reads_alike_in_both_forms(name):
    config, after = preset_config(name)
    expect = PRESET_EXPECT[name]
    params, legacy = config["rope_parameters"], config["rope_scaling"]
    # the published values, in both forms, identically
    assert params["rope_type"] == expect["rope_type"]
    assert params["rope_theta"] == config["rope_theta"] == expect.get("rope_theta", params["rope_theta"])
    assert config["max_position_embeddings"] == expect["max_position_embeddings"]
    if expect["rope_type"] == "default":
        assert legacy is None
    else:
        assert legacy == {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        assert legacy["factor"] == expect["factor"]
        assert legacy["original_max_position_embeddings"] == expect["original"]
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if key in expect:
                assert legacy[key] == expect[key]
    ours, our_factor = rope.rope_frequencies(after)
    views = scale.config_views(config)
    for view, cfg in views.items():  # transformers 5 reading the file whole, v5 keys only, legacy keys only
        theirs, their_factor = hf_frequencies(cfg)
        assert_rel(theirs, ours)
        assert their_factor == pytest.approx(our_factor, rel=RTOL), view
        assert_rel(rope.rope_frequencies(rope.rope_spec_from_config(cfg))[0], ours, 1e-12)
    legacy_inv, legacy_factor = legacy_reader(views["rope_scaling + rope_theta only"])
    assert_rel(legacy_inv, ours)
    assert legacy_factor == pytest.approx(our_factor, rel=RTOL)


def test_v5_save_loses_legacy_keys_and_sync_restores_them(tmp_path):
    """transformers 5 save_pretrained writes only rope_parameters: a legacy reader then silently gets theta 1e4
    and no YaRN. sync_rope_config_file (for stages that save with transformers) writes both forms back."""
    config, after, _, _ = plan_config(AFM_4K, ["--preset", "afm-64k"])
    hf_config(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in saved and not saved.get("rope_scaling")
    assert legacy_reader(saved)[1] == 1.0  # the legacy reader lost YaRN
    assert_rel(rope.rope_frequencies(read_spec(tmp_path))[0], rope.rope_frequencies(after)[0], 1e-12)
    rope.sync_rope_config_file(tmp_path)
    assert_rel(legacy_reader(json.loads((tmp_path / "config.json").read_text()))[0], rope.rope_frequencies(after)[0])


def test_reader_follows_transformers_on_the_traps():
    # rope_scaling wins when both forms exist and disagree
    both = dict(LLAMA3_8B, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                            "original_max_position_embeddings": 8192},
                rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert rope.rope_spec_from_config(both).rope_type == "linear"
    assert hf_config(both).rope_parameters["rope_type"] == "linear"
    # a top-level original_max_position_embeddings overrides the rope dict's (applied when the rotary is built)
    top = dict(AFM_SHIPPED, original_max_position_embeddings=2048)
    assert rope.rope_spec_from_config(top).original_max_position_embeddings == 2048
    assert_rel(rope.rope_frequencies(rope.rope_spec_from_config(top))[0], hf_frequencies(top)[0])
    # theta only inside rope_parameters (a v5-saved file): read it, never default to 10000
    v5 = {k: v for k, v in LLAMA3_8B.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert rope.rope_spec_from_config(v5).theta == 5e5
    # no theta anywhere: the family's default, as transformers 5 (SmolLM3: 2e6, not 1e4)
    bare = {k: v for k, v in LLAMA3_8B.items() if k != "rope_theta"} | {"model_type": "smollm3"}
    assert rope.rope_spec_from_config(bare).theta == hf_config(bare).rope_parameters["rope_theta"]
    # original pretraining length of scaled models (UltraLong's rule: Llama-3.1 is 8192, not 131072)
    assert rope.original_context_length(rope.rope_spec_from_config(LLAMA31_8B))[0] == 8192
    assert rope.addressable_length(rope.rope_spec_from_config(LLAMA31_8B)) == 131072
    assert rope.original_context_length(rope.rope_spec_from_config(AFM_SHIPPED))[0] == 4096
    assert rope.addressable_length(rope.rope_spec_from_config(AFM_SHIPPED)) == 65536
    # MLA models rotate qk_rope_head_dim channels
    assert rope.rope_spec_from_config(DSV3).rotary_dim == 64
    # partial rotation (StableLM: a quarter of each head), top-level in the legacy form, inside rope_parameters in v5
    partial = dict(model_type="stablelm", hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=64, num_hidden_layers=1, vocab_size=128, max_position_embeddings=4096,
                   rope_theta=10000.0, partial_rotary_factor=0.25, rope_scaling={"rope_type": "linear", "factor": 2.0})
    spec = rope.rope_spec_from_config(partial)
    assert spec.rotary_dim == 16
    assert_rel(rope.rope_frequencies(spec)[0], hf_frequencies(partial)[0])
    written = rope.apply_rope_to_config(partial, spec)
    assert written["rope_parameters"]["partial_rotary_factor"] == written["partial_rotary_factor"] == 0.25
    for cfg in scale.config_views(written).values():
        assert_rel(hf_frequencies(cfg)[0], rope.rope_frequencies(spec)[0])
    assert_rel(legacy_reader(written)[0], rope.rope_frequencies(spec)[0])


# -------------------------------------------------------------------------------------------------------------
# The script end to end on the tiny Llama (2 layers, head_dim 16, 256 positions).


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_patched_model_reloads_with_identical_logits(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_weights = Path(tiny_llama_dir) / "model.safetensors"
    before_hash = sha(src_weights)
    out = tmp_path / "yarn4"
    doc = tmp_path / "doc.txt"
    doc.write_text(next(common.book_documents())["text"][:4000] if common.kjv_path() else "hello world. " * 400)
    scale.main(["--model", tiny_llama_dir, "--method", "yarn", "--factor", "4", "--out", str(out),
                "--ppl-check", str(doc), "--ppl-lengths", "64,200"])
    # weights hard-linked, untouched
    assert (out / "model.safetensors").stat().st_ino == src_weights.stat().st_ino
    assert sha(src_weights) == before_hash
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    assert AutoTokenizer.from_pretrained(out).model_max_length == 1024
    manifest = common.read_manifest(out)
    assert manifest["stage"] == "02_rope_scale" and manifest["rope"]["original_max_position_embeddings"] == 256
    report = json.loads((out / "rope_report.json").read_text())
    assert report["yarn_bands"] is not None and len(report["dims"]) == 8
    assert all(v["rel_diff"] < 1e-6 for v in report["verification"].values())
    assert (out / "rope_report.png").read_bytes()[:4] == b"\x89PNG"

    ids = torch.arange(3, 200)[None]
    patched = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": cfg.rope_parameters["rope_theta"], "factor": 4.0,
                           "original_max_position_embeddings": 256}
    in_memory = AutoModelForCausalLM.from_config(cfg).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    in_memory.load_state_dict(original.state_dict())
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, in_memory(ids).logits)
        assert not torch.allclose(patched(ids).logits, original(ids).logits)  # the patch took effect
    # --ppl-check's numbers: the perplexity of the first N tokens of the document, before (the original model) and
    # after (YaRN x4 set in memory above), as transformers' own forward and its own causal-LM loss give them
    doc_ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(doc.read_text())["input_ids"]
    assert [row["length"] for row in report["ppl_check"]] == [64, 200]
    for row in report["ppl_check"]:
        x = torch.tensor([doc_ids[:row["length"]]])
        with torch.no_grad():
            before, after = (math.exp(m(x, labels=x).loss.item()) for m in (original, in_memory))
        # 3e-6: the two sides agree to < 1e-6; before and after (a random model) differ by ~2e-5
        assert row["ppl_before"] == pytest.approx(before, rel=3e-6)
        assert row["ppl_after"] == pytest.approx(after, rel=3e-6)


D_TINY = 16  # the tiny Llama's head_dim (rotary dimension)
FOUR_X = {  # 02's flags: what transformers must read from the written config (max_position_embeddings, RoPE)
    "yarn": (["--method", "yarn", "--target-len", "1024"],
             1024, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    "theta": (["--method", "theta", "--theta", "1e6", "--target-len", "1024"],
              1024, {"rope_type": "default", "rope_theta": 1e6}),
    "linear": (["--method", "linear", "--factor", "4"], 256, {"rope_type": "linear", "factor": 4.0}),
    "ntk": (["--method", "ntk", "--factor", "4"],  # b' = b s^(d/(d-2)) (docs/rope.md#ntk-aware-dynamic-ntk-and-abf)
            1024, {"rope_type": "default", "rope_theta": 10000.0 * 4 ** (D_TINY / (D_TINY - 2))}),
    "dynamic": (["--method", "dynamic", "--factor", "4"], 256, {"rope_type": "dynamic", "factor": 4.0}),
}


@pytest.mark.parametrize("method", list(FOUR_X))
def test_tiny_model_runs_at_4x_its_original_length(tiny_llama_dir, tmp_path, method):
    """The patched model at 1024 tokens (4x) gives the logits of the original weights under the RoPE written out
    above, set in memory on transformers' own model (linear and dynamic keep max_position_embeddings at 256)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    flags, positions, rope_parameters = FOUR_X[method]
    out = tmp_path / "out"
    scale.main(["--model", tiny_llama_dir, *flags, "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == positions
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1024
    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    assert cfg.head_dim == D_TINY and cfg.rope_parameters["rope_theta"] == 10000.0
    cfg.rope_parameters = {"rope_theta": 10000.0, **rope_parameters}
    cfg.max_position_embeddings = positions
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    reference = AutoModelForCausalLM.from_config(cfg).eval()
    reference.load_state_dict(original.state_dict())
    ids = torch.randint(10, 1000, (1, 1024), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        assert logits.shape[1] == 1024
        assert torch.allclose(logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, original(ids).logits, rtol=1e-3, atol=1e-3)  # the patch took effect


def test_weights_copied_when_links_fail(tiny_llama_dir, tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(scale.os, "link", no_link)
    out = tmp_path / "copied"
    scale.main(["--model", tiny_llama_dir, "--method", "linear", "--factor", "2", "--out", str(out)])
    src = Path(tiny_llama_dir) / "model.safetensors"
    assert (out / "model.safetensors").stat().st_ino != src.stat().st_ino
    assert sha(out / "model.safetensors") == sha(src)


def test_repatch_composes_relative_to_the_original(tiny_llama_dir, tmp_path, capsys):
    first, second = tmp_path / "x4", tmp_path / "x8"
    scale.main(["--model", tiny_llama_dir, "--method", "yarn", "--factor", "4", "--out", str(first)])
    scale.main(["--model", str(first), "--method", "yarn", "--target-len", "2048", "--out", str(second)])
    printed = capsys.readouterr().out
    assert "already scaled" in printed and "REPLACES" in printed
    spec = read_spec(second)
    assert (spec.factor, spec.original_max_position_embeddings, spec.max_position_embeddings) == (8.0, 256, 2048)


def test_ultralong_on_llama31_and_afm_warning(tmp_path, capsys):
    """Config-only dry runs: UltraLong's factor is relative to Llama-3.1's 8192 (1M -> 128), replacing llama3;
    AFM's factor 20 with 64K warns but is written as published."""
    _, after, notes, _ = plan_config(LLAMA31_8B, ["--preset", "ultralong-1m"])
    assert after.factor == 128 and after.original_max_position_embeddings == 8192
    assert any("REPLACES" in n and "llama3 x8" in n for n in notes)
    _, after, _, warnings = plan_config(AFM_4K, ["--preset", "afm-64k"])
    assert after.factor == 20 and any("factor 20 != " in w for w in warnings)
    _, after, notes, _ = plan_config(LLAMA31_8B, ["--method", "llama3"])  # pass-through
    assert after == rope.rope_spec_from_config(LLAMA31_8B)
    (tmp_path / "llama31").mkdir()
    (tmp_path / "llama31" / "config.json").write_text(json.dumps(LLAMA31_8B))
    scale.main(["--model", str(tmp_path / "llama31"), "--preset", "ultralong-1m", "--dry-run"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama31"]  # a dry run writes nothing
    printed = capsys.readouterr().out
    assert "UltraLong" in printed and "yarn x128 from 8192" in printed and "28 -> 35" in printed


@pytest.mark.parametrize("case", ["no-rope", "factor-below-1", "target-below-original"])
def test_bad_input_one_line_no_output(tiny_llama_dir, tmp_path, capsys, case):
    out = tmp_path / "out"
    model = tiny_llama_dir
    if case == "no-rope":
        model = tmp_path / "gpt2"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 4}))
        flags = ["--method", "yarn", "--factor", "4"]
    elif case == "factor-below-1":
        flags = ["--method", "yarn", "--factor", "0.5"]
    else:
        flags = ["--method", "yarn", "--target-len", "128"]
    with pytest.raises(SystemExit) as exc:
        common.run_main(scale.main, ["--model", str(model), *flags, "--out", str(out)])
    assert exc.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert {"no-rope": "no rotary", "factor-below-1": "< 1", "target-below-original": "shorter"}[case] in errors[0]
    assert not out.exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


# -------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M (native 8192 positions): YaRN x4 relative to its 8192 original keeps perplexity on a
# 3K-token real document within 15% (the document is the stdlib `logging` package: +11% measured on CPU; YaRN's
# short-context cost is document-dependent: `json` +17%, KJV Genesis +23% at the same length).


SMOLLM2_TOKENS = 3072  # most of the check's time goes to two forward passes of this length
SMOLLM2_CHECK = 256  # 02's own --ppl-check, at a length where it costs little, against the same reference


@pytest.mark.slow
def test_smollm2_yarn_x4_keeps_perplexity(smollm2_dir, tmp_path):
    """The perplexities come from transformers' own forward of the original weights, with the SmolLM2 config and
    with YaRN x4 set in memory (next-token cross-entropy written here); 02's --ppl-check and its written config
    are checked against the same numbers at SMOLLM2_CHECK tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    doc = next(d for d in common.code_repo_documents() if d["id"] == "stdlib/logging")
    text = tmp_path / "logging.txt"
    text.write_text(doc["text"][:20000])  # ~4.5K tokens; the check uses the first SMOLLM2_TOKENS
    ids = torch.tensor([AutoTokenizer.from_pretrained(smollm2_dir)(text.read_text())["input_ids"][:SMOLLM2_TOKENS]])
    assert ids.shape[1] == SMOLLM2_TOKENS
    nll = {}
    for tag in ("before", "after"):
        cfg = AutoConfig.from_pretrained(smollm2_dir)
        assert cfg.max_position_embeddings == 8192
        if tag == "after":
            cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": cfg.rope_parameters["rope_theta"],
                                   "factor": 4.0, "original_max_position_embeddings": 8192}
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, config=cfg).eval()
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        nll[tag] = -logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]  # -log p(token t+1 | tokens <= t)
        del model, logits

    def ppl(tag, n):  # the first n tokens: n - 1 predictions
        return math.exp(nll[tag][:n - 1].mean().item())

    assert ppl("before", SMOLLM2_TOKENS) < 30  # the model reads this text well
    assert ppl("after", SMOLLM2_TOKENS) <= 1.15 * ppl("before", SMOLLM2_TOKENS)
    out = tmp_path / "smol-yarn4"
    scale.main(["--model", smollm2_dir, "--method", "yarn", "--factor", "4", "--out", str(out),
                "--ppl-check", str(text), "--ppl-lengths", str(SMOLLM2_CHECK)])
    report = json.loads((out / "rope_report.json").read_text())
    assert report["original_length"] == 8192 and report["after"]["factor"] == 4.0
    (row,) = report["ppl_check"]
    assert row["length"] == SMOLLM2_CHECK
    assert row["ppl_before"] == pytest.approx(ppl("before", SMOLLM2_CHECK), rel=1e-4)
    assert row["ppl_after"] == pytest.approx(ppl("after", SMOLLM2_CHECK), rel=1e-4)
    assert ppl("after", SMOLLM2_CHECK) > 1.2 * ppl("before", SMOLLM2_CHECK)  # so the two are told apart
