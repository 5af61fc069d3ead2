"""The layout promise, checked: which module may import which (written down once, below), no function longer than
the rule allows, README's "copy" column and each module's "Outside this repository" line derived from the actual
imports, each topic module working when copied with exactly that set into a project that has nothing else of
longctx, and no text in the repository pointing to a file or heading that does not exist."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lc_testutil import ROOT

# ---------------------------------------------------------------------------------------------------------------
# The import rule, written down once.
#
# A stage (NN_name.py at the top level) and a script under recipes/ or bench/ may import any topic module; nothing
# imports a stage (a script that needs one loads it by path). A topic module (every other top-level .py file)
# imports the standard library, installed packages and common.py, plus what this table allows, each for the
# reason given. README's "copy" column and the "Outside this repository (copy ...)" line of each module's docstring
# are the module plus what it imports, transitively.
ALSO_ALLOWED = {
    "context_parallel": {"varlen_attention"},  # splits the rows varlen attention attends over
    "fsdp_train": {"safe_output"},  # checkpoints and the run directory are outputs that must never cost data
    "hf_export": {"safe_output", "rope"},  # OUT/final written atomically, its config's RoPE in both forms
    "helmet": {"ruler"},  # HELMET's recall tasks are RULER's needles, haystacks, length fitting and intervals
    "probes": {"ruler"},  # the needle probe is RULER's NIAH, scored as RULER scores it
}
STAGES = sorted(p.stem for p in ROOT.glob("[0-9][0-9]_*.py"))
TOPIC_MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in STAGES)
SCRIPTS = sorted([*(ROOT / "recipes").glob("*.py"), *(ROOT / "bench").glob("*.py")])

# The function rule: no function longer than this many lines (def to last line), except a stage's `train`.
MAX_FUNCTION_LINES = 80
MAX_STAGE_LOOP_LINES = 120


def local_imports(path: Path) -> set[str]:
    """The top-level modules of this repository that `path` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names & (set(TOPIC_MODULES) | set(STAGES))


def copy_set(module: str) -> set[str]:
    """What to copy to use `module` elsewhere: the module and every topic module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(local_imports(ROOT / f"{m}.py"))
    return seen


@pytest.mark.parametrize("module", TOPIC_MODULES)
def test_topic_module_follows_the_import_rule(module):
    """A topic module imports at most common.py and what ALSO_ALLOWED names for it; every module the table names
    exists."""
    assert set(ALSO_ALLOWED) <= set(TOPIC_MODULES) and set().union(*ALSO_ALLOWED.values()) <= set(TOPIC_MODULES)
    allowed = {"common"} | ALSO_ALLOWED.get(module, set())
    imported = local_imports(ROOT / f"{module}.py") - {module}
    assert imported <= allowed, f"{module}.py imports {sorted(imported - allowed)}: not in the import rule"


@pytest.mark.parametrize("path", [ROOT / f"{s}.py" for s in STAGES] + SCRIPTS, ids=lambda p: p.name)
def test_stages_and_scripts_import_no_stage(path):
    assert not local_imports(path) & set(STAGES), f"{path.name} imports a stage"


def function_lengths() -> list[tuple[str, str, int, int]]:
    """(file, function, lines, limit) of every function in the top-level modules, recipes/ and bench/."""
    found = []
    for path in sorted([*ROOT.glob("*.py"), *SCRIPTS]):
        stage = path.stem in STAGES
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_STAGE_LOOP_LINES if stage and node.name == "train" else MAX_FUNCTION_LINES
                found.append((str(path.relative_to(ROOT)), node.name, node.end_lineno - node.lineno + 1, limit))
    return found


def test_usage_lines_keep_their_continuation_backslashes():
    """A shell line continued in a module docstring's usage must show its backslash in --help: in a docstring that
    is not raw, a single backslash at a line's end joins the two lines (write it as two)."""
    lone = re.compile(r"(?<!\\)(\\\\)*\\$")
    joined = []
    for path in sorted([*ROOT.glob("*.py"), *SCRIPTS]):
        source = path.read_text()
        body = ast.parse(source).body
        if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)):
            continue
        text = ast.get_source_segment(source, body[0])
        if text.lstrip()[:1] in "rR":
            continue
        for offset, line in enumerate(text.splitlines()):
            if lone.search(line):
                joined.append(f"{path.relative_to(ROOT)}:{body[0].lineno + offset}")
    assert not joined, "a lone backslash ends these docstring lines: " + ", ".join(joined)


def test_no_function_is_longer_than_the_rule():
    """No function over 80 lines, a stage's training loop (its `train`) over 120."""
    too_long = [f"{f}: {name} has {n} lines (at most {limit})" for f, name, n, limit in function_lengths() if n > limit]
    assert not too_long, "\n".join(too_long)


def readme_copy_column() -> dict[str, set[str]]:
    """{module: the files README's "to reuse it in your own project, copy" cell names} for each row whose "open"
    cell is one topic module."""
    rows, in_table = {}, False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| to see or change | open | to reuse it in your own project, copy |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if in_table and len(cells) == 3:
            opened = re.fullmatch(r"`(\w+)\.py`", cells[1])
            if opened and opened.group(1) in TOPIC_MODULES:
                rows[opened.group(1)] = set(re.findall(r"`(\w+)\.py`", cells[2]))
    return rows


def test_readme_copy_column_is_each_module_with_its_imports():
    """README lists every topic module, and with it exactly the module plus its transitive local imports."""
    rows = readme_copy_column()
    assert sorted(rows) == TOPIC_MODULES, f"README's table lacks {sorted(set(TOPIC_MODULES) - set(rows))}"
    wrong = {m: (sorted(rows[m]), sorted(copy_set(m))) for m in TOPIC_MODULES if rows[m] != copy_set(m)}
    assert not wrong, "README copy column (listed, imported): " + str(wrong)


@pytest.mark.parametrize("module", [m for m in TOPIC_MODULES if m != "common"])
def test_docstring_shows_use_elsewhere_with_what_to_copy(module):
    """Each topic module's docstring says how to use it elsewhere, "Outside this repository (copy this file ...)",
    naming exactly the other files it imports (or "this file alone")."""
    doc = ast.get_docstring(ast.parse((ROOT / f"{module}.py").read_text())) or ""
    m = re.search(r"Outside this repository \(copy this file([^)]*)\)", doc)
    assert m, f"{module}.py's docstring must show its use elsewhere: 'Outside this repository (copy this file ...)'"
    named = set(re.findall(r"(\w+)\.py", m.group(1)))
    assert named == copy_set(module) - {module}, (m.group(0), sorted(copy_set(module) - {module}))
    assert named or m.group(1).strip().startswith("alone"), m.group(0)


def run_copied(tmp_path, module: str, code: str) -> str:
    """Copy `module` with what it imports (copy_set) alone into an empty directory and run `code` there in a
    fresh interpreter that cannot see the repository (only the installed packages); returns its stdout."""
    modules = copy_set(module)
    for m in modules:
        shutil.copy(ROOT / f"{m}.py", tmp_path / f"{m}.py")
    guard = ("import importlib.util, sys\n"
             f"assert all(importlib.util.find_spec(m) is None for m in {sorted(set(TOPIC_MODULES) - modules)!r}), "
             "'the repository is visible'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", guard + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


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
    assert run_copied(tmp_path, "varlen_attention", VARLEN_COPY).strip() == "ok"


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
    assert run_copied(tmp_path, "rope", ROPE_COPY).strip() == "ok"


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
    """packing.py alone best-fits a list of token lists into rows; every document's pieces reassemble
    to it exactly."""
    assert run_copied(tmp_path, "packing", PACKING_COPY).startswith("ok")


SAFE_OUTPUT_COPY = r"""
from pathlib import Path
import common, safe_output

Path("model").mkdir()
try:
    safe_output.check_output("model/eval", {"--model": "model"})
except common.UserError as exc:
    assert "lies inside the input --model" in str(exc), exc
else:
    raise AssertionError("an output inside an input was not refused")
with safe_output.output_dir("out", inputs={"--model": "model"}) as tmp:
    (tmp / "a.txt").write_text("first")
try:
    with safe_output.output_dir("out", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("half")
        common.fail("the new output fails half written")
except common.UserError:
    pass
else:
    raise AssertionError("the failure inside output_dir did not reach the caller")
assert Path("out/a.txt").read_text() == "first" and not [p for p in Path(".").iterdir() if p.name.startswith(".out")]
print("ok")
"""


def test_safe_output_copied_alone_protects_inputs_and_the_old_output(tmp_path):
    """safe_output.py (+ common.py): an output inside an input is refused; a failed --overwrite leaves the old
    output and nothing beside it."""
    assert run_copied(tmp_path, "safe_output", SAFE_OUTPUT_COPY).strip() == "ok"


HF_EXPORT_COPY = r"""
import json
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
import hf_export

torch.manual_seed(0)
config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
model = LlamaForCausalLM(config).eval()
hf_export.export_hf(model, config, "final", torch.float32, None, None, {"stage": "mine", "args": {}})
written = json.loads(open("final/config.json").read())
assert written["rope_scaling"]["rope_type"] == "yarn" and written["rope_scaling"]["factor"] == 4.0, written
assert written["rope_parameters"]["rope_type"] == "yarn" and written["rope_parameters"]["factor"] == 4.0, written
ids = torch.randint(0, 300, (1, 20))
with torch.no_grad():
    assert torch.equal(AutoModelForCausalLM.from_pretrained("final")(ids).logits, model(ids).logits)
print("ok")
"""


def test_hf_export_copied_alone_writes_a_model_transformers_loads(tmp_path):
    """hf_export.py (+ rope.py, safe_output.py, common.py) exports a tiny YaRN Llama: config.json holds the RoPE
    settings in both forms, and transformers loads weights that give the same logits as the model exported."""
    assert run_copied(tmp_path, "hf_export", HF_EXPORT_COPY).strip() == "ok"


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
