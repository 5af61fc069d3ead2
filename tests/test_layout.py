"""The layout promise: each topic module works when copied alone (with common.py) into a project that has
nothing else of longctx, and no text in the repository points to a file or heading that does not exist."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lc_testutil import ROOT

TOPIC_MODULES = ["common", "packing", "packed_data", "tokenizing", "mds", "rope", "varlen_attention",
                 "context_parallel", "fsdp_train", "ruler", "tracking", "probes", "memory_plan", "activation_memory",
                 "long_inference", "safe_output", "hf_export", "train_flags"]
# beyond common.py: context parallelism builds on varlen attention; what writes a training run's outputs on safe_output
ALSO_ALLOWED = {"context_parallel": {"varlen_attention"}, "fsdp_train": {"safe_output"}, "hf_export": {"safe_output"}}


def run_copied(tmp_path, modules: list[str], code: str) -> str:
    """Copy `modules` alone into an empty directory and run `code` there in a fresh interpreter that cannot
    see the repository (only the installed packages); returns its stdout."""
    for m in modules:
        shutil.copy(ROOT / f"{m}.py", tmp_path / f"{m}.py")
    guard = ("import importlib.util, sys\n"
             f"assert all(importlib.util.find_spec(m) is None for m in {sorted(set(TOPIC_MODULES) - set(modules))!r}), "
             "'the repository is visible'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", guard + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("module", TOPIC_MODULES)
def test_topic_module_imports_at_most_common(module):
    """A topic module imports the standard library, torch / transformers / numpy and at most common.py (context
    parallelism may build on varlen_attention.py, training and its export on safe_output.py); never a stage."""
    allowed = {"common"} | ALSO_ALLOWED.get(module, set())
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    local = {p.stem for p in ROOT.glob("*.py")}
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported & local <= allowed - {module}, imported & local
    doc = ast.get_docstring(tree) or ""
    assert "Outside this repository" in doc or module == "common", "the docstring must show use elsewhere"


VARLEN_COPY = r"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import varlen_attention as va

torch.manual_seed(0)
config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
model = LlamaForCausalLM(config).eval()
model.config._attn_implementation = va.register_attention()
va.check_attention(model, torch.device("cpu"), torch.float32, config.vocab_size)
lens = [40, 25, 63]
ids = torch.randint(3, 300, (sum(lens),))
row = {"index": 0, "input_ids": ids.numpy(), "doc_lens": lens, "num_pad": 0}
mb = va.build_micro_batch([row], sum(lens))
with torch.no_grad():
    packed = va.forward_hidden(model, mb)[0]
    model.config._attn_implementation = "eager"   # each document alone, through transformers' own attention
    start = 0
    for n in lens:
        alone = model.model(input_ids=ids[start:start + n].view(1, -1)).last_hidden_state[0]
        err = (packed[start:start + n] - alone).abs().max().item()
        assert err < 1e-5, (n, err)
        start += n
print("ok")
"""


def test_varlen_attention_copied_alone_matches_documents_run_alone(tmp_path):
    """varlen_attention.py (+ common.py), registered on a tiny random Llama built from a config: a packed row of
    three documents equals each document run alone through transformers' eager attention (fp32, 1e-5)."""
    assert run_copied(tmp_path, ["varlen_attention", "common"], VARLEN_COPY).strip() == "ok"


ROPE_COPY = r"""
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
import rope

config = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 4096, "rope_theta": 500000.0}
before = rope.rope_spec_from_config(config)
original, _ = rope.original_context_length(before)
after = rope.scaled_rope_spec(before, "yarn", original=original, factor=4, beta_fast=32, beta_slow=1)
patched = rope.apply_rope_to_config(config, after)
assert patched["max_position_embeddings"] == 4 * 4096 and patched["rope_scaling"]["factor"] == 4
ours, factor = rope.rope_frequencies(after)
hf = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in patched.items() if k != "model_type"}))
rel = ((ours.float() - hf.inv_freq.float()).abs() / hf.inv_freq.float()).max().item()
assert rel < 1e-6, rel
assert abs(factor - hf.attention_scaling) < 1e-6, (factor, hf.attention_scaling)
assert abs(factor - (0.1 * __import__("math").log(4) + 1)) < 1e-9   # YaRN's 0.1 ln(s) + 1
print("ok")
"""


def test_rope_copied_alone_patches_yarn_as_transformers_computes_it(tmp_path):
    """rope.py (+ common.py) patches a config for YaRN x4; its inverse frequencies and attention factor equal
    transformers' own rotary embedding built from the patched config."""
    assert run_copied(tmp_path, ["rope", "common"], ROPE_COPY).strip() == "ok"


PACKING_COPY = r"""
import numpy as np
import packing

rng = np.random.default_rng(0)
docs = [list(rng.integers(5, 1000, size=n)) for n in (5, 64, 100, 1, 30, 33, 200, 7, 63, 64, 2)]
tagged = [{"input_ids": np.array(d), "doc": np.full(len(d), i), "pos": np.arange(len(d))} for i, d in enumerate(docs)]
rows = list(packing.pack_documents(tagged, 64, "best-fit", pad_values={"doc": -1, "pos": -1}, pad_id=0))
pieces = {i: [] for i in range(len(docs))}
for r in rows:
    assert len(r["input_ids"]) == 64 and sum(r["doc_lens"]) == 64
    for tok, doc, pos in zip(r["input_ids"], r["doc"], r["pos"]):
        if doc >= 0:
            pieces[int(doc)].append((int(pos), int(tok)))
for i, d in enumerate(docs):
    assert [t for _, t in sorted(pieces[i])] == [int(t) for t in d], i
print("ok", len(rows))
"""


def test_packing_copied_alone_best_fit_reassembles_every_document(tmp_path):
    """packing.py (+ common.py) best-fits a list of token lists into rows; every document's pieces reassemble
    to it exactly."""
    assert run_copied(tmp_path, ["packing", "common"], PACKING_COPY).startswith("ok")


SAFE_OUTPUT_COPY = r"""
from pathlib import Path
import common, safe_output

Path("model").mkdir()
try:
    safe_output.check_output("model/eval", {"--model": "model"})
except common.UserError as exc:
    assert "lies inside the input --model" in str(exc), exc
with safe_output.output_dir("out", inputs={"--model": "model"}) as tmp:
    (tmp / "a.txt").write_text("first")
try:
    with safe_output.output_dir("out", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("half")
        common.fail("stop")
except common.UserError:
    pass
assert Path("out/a.txt").read_text() == "first" and not [p for p in Path(".").iterdir() if p.name.startswith(".out")]
print("ok")
"""


def test_safe_output_copied_alone_protects_inputs_and_the_old_output(tmp_path):
    """safe_output.py (+ common.py): an output inside an input is refused; a failed --overwrite leaves the old
    output and nothing beside it."""
    assert run_copied(tmp_path, ["safe_output", "common"], SAFE_OUTPUT_COPY).strip() == "ok"


# ---------------------------------------------------------------------------------------------------------------
# Every cited file and heading exists.

PATH_RE = re.compile(r"(?<![\w/.-])((?:\.\./)*(?:[\w.-]+/)*[\w.-]+\.(?:md|py|sh|txt|json))(#[\w-]+)?")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (lowercase, punctuation dropped, spaces to hyphens)."""
    seen, out, in_code = {}, set(), False
    for line in path.read_text().splitlines():
        in_code ^= line.startswith("```")
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1).replace("`", ""))
            slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def cited_texts() -> list[tuple[Path, str]]:
    """README and docs/ in full, recipes/'s shell files in full; of the Python files, the module docstrings and
    comments."""
    texts = [(p, p.read_text()) for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
                                          *sorted((ROOT / "recipes").glob("*.sh"))]]
    for p in sorted([*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "recipes").glob("*.py"),
                     *(ROOT / "tests").glob("*.py")]):
        source = p.read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
        comments = "\n".join(line.split("#", 1)[1] for line in source.splitlines() if line.lstrip().startswith("#"))
        texts.append((p, doc + "\n" + comments))
    return texts


def resolve(citing: Path, target: str) -> Path | None:
    for base in (citing.parent, ROOT):
        if (base / target).exists():
            return base / target
    return None


def test_every_cited_file_and_heading_exists():
    """Markdown links, paths into this repository's own folders (docs/, recipes/, bench/, tests/, assets/) and
    bare `NAME.md` mentions must exist; an `#anchor` must be a heading of its page. A path named right after
    another repository ("pytorch/torchtitan `docs/fsdp.md`") is a source, not a link, and is not checked."""
    outputs = {"runs", "__pycache__"}  # git-ignored folders that runs create; what they hold is not the repository
    own_dirs = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} - outputs
    md_names = {p.name for p in ROOT.rglob("*.md") if not {".venv", ".cache", ".git", *outputs} & set(p.parts)}
    other_repo = re.compile(r"\b([\w-]+)/[\w.-]+[`,:]?\s*`?$")
    missing = []
    for path, text in cited_texts():
        targets = [(t, True) for t in LINK_RE.findall(text) if not t.startswith(("http", "mailto:", "#"))]
        for m in PATH_RE.finditer(text):
            before = text[max(0, m.start() - 80):m.start()].splitlines()[-1:] or [""]
            owner = other_repo.search(before[0])
            if owner is None or owner.group(1) in own_dirs:
                targets.append((m.group(1) + (m.group(2) or ""), False))
        for target, is_link in targets:
            page, _, anchor = target.partition("#")
            if is_link or page.split("/")[0] in own_dirs:
                found = resolve(path, page)
            elif "/" not in page and page.endswith(".md"):
                found = resolve(path, page) or (ROOT if page in md_names else None)  # e.g. a report.md it writes
            else:
                continue  # a path in another repository, or an output a command writes
            if found is None:
                missing.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and found.suffix == ".md" and anchor not in heading_anchors(found):
                missing.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not missing, "\n".join(sorted(set(missing)))
