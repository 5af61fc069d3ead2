"""Expected training throughput under context parallelism, DERIVED (not measured): Llama-3.1-8B on H100s.

`--cp` has run only on CPUs so far (docs/benchmarks.md); this script turns published anchors and the collectives'
volume into the per-GPU tokens/s a user should expect from `03_continued_pretrain.py --cp N`, and checks that the
communication hides behind the compute. Every input is a named constant below; change one and re-run.

Model: compute time per token = FLOPs_tt(S) / (eta * peak), with FLOPs_tt the torchtitan convention
(6 N_non-embedding + 12 L H d S per token: non-causal attention over the whole row, masks ignored) and eta the
efficiency that convention implies in torchtitan's published Llama-3-8B H100 table at the same CP degree
(docs/training.md#published-throughput). Document masking (ProLong) makes the real attention work smaller than
FLOPs_tt counts, so for doc-masked rows the figure is a lower bound.

Communication per GPU per row (bf16, activation checkpointing = one extra forward):
- Ulysses (doc-masked rows): 4 all-to-alls per layer (q, k, v, out) in the forward, 4 in the backward, 4 in the
  recompute; each sends (N-1)/N of the rank's slice: (2 Hq d + 2 Hkv d) * 2 bytes per local token per layer.
- ring (unmasked rows): every rank receives the other ranks' K and V once per forward (and once more in the
  recompute) and K, V plus their gradients in the backward: 4 * (N-1)/N * S * 2 Hkv d * 2 bytes per layer.
Links: NVLink 4 inside a node (~360 GB/s per direction achieved of 450), InfiniBand NDR across nodes (one
400 Gb/s NIC per GPU, ~45 GB/s achieved).

Usage:
    python bench/cp_estimate.py            # prints the markdown table in docs/benchmarks.md
"""
from __future__ import annotations

# Llama-3.1-8B (config.json of meta-llama/Llama-3.1-8B)
L, HIDDEN, HQ, HKV, D, FFN, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
N_NON_EMBED = L * (HIDDEN * HQ * D * 2 + HIDDEN * HKV * D * 2 + 3 * HIDDEN * FFN + 2 * HIDDEN) + VOCAB * HIDDEN
PEAK = 989e12  # H100 SXM dense bf16 FLOP/s
NVLINK, IB = 360e9, 45e9  # achieved bytes/s per GPU per direction
GPUS_PER_NODE = 8

# torchtitan, benchmarks/llama3_h100_202412_torchtitan.md (8 H100s, FSDP+CP, compile, Float8, full AC):
# (cp degree, row length, tokens/s/GPU)
TORCHTITAN = [(1, 32768, 3890), (2, 65536, 2540), (4, 131072, 1071), (8, 262144, 548)]
# ProLong (paper Table 9): H100-hours for 20B tokens -> tokens/s/GPU; Table 15: 64K, 8xH100, varlen + reordering
PROLONG = {65536: 20e9 / (2.2e3 * 3600), 524288: 20e9 / (12.2e3 * 3600)}
PROLONG_TABLE15_64K = 3095


def flops_tt(seq: int) -> float:
    return 6 * N_NON_EMBED + 12 * L * HQ * D * seq


def implied_eta(cp: int) -> float:
    _, seq, tps = next(t for t in TORCHTITAN if t[0] == min(cp, 8))
    return tps * flops_tt(seq) / PEAK


def memory_gib(seq: int, cp: int, world: int) -> float:
    """Rough peak per GPU: fp32 master + grads + Adam (16 B/param) sharded over the world, the layer inputs kept
    by full activation checkpointing, and one layer's recompute working set (q/k/v/out, MLP in/out, norms)."""
    local = seq / cp
    states = 16 * (N_NON_EMBED + VOCAB * HIDDEN) / world
    kept = L * local * HIDDEN * 2
    working = local * (6 * HIDDEN + 2 * HKV * D * max(1, cp // HKV) + 3 * FFN) * 2 * 2
    return (states + kept + working) / 2**30


def comm_seconds_per_token(seq: int, cp: int, doc_mask: bool) -> float:
    """Seconds of communication per local token (per GPU), assuming a cp group spans nodes only past 8."""
    if cp == 1:
        return 0.0
    link = NVLINK if cp <= GPUS_PER_NODE else IB
    frac = (cp - 1) / cp
    if doc_mask:  # Ulysses: bytes per local token per layer, x3 (forward, backward, recompute)
        per_token = 3 * frac * (2 * HQ * D + 2 * HKV * D) * 2 * L
    else:  # ring: 4 passes of K and V of the whole row per layer, spread over the rank's S/cp tokens
        per_token = 4 * frac * seq * 2 * HKV * D * 2 * L / (seq / cp)
    return per_token / link


def rows():
    out = []
    for seq, doc_mask in ((65536, True), (524288, True), (1048576, False)):
        for world in (8, 64):
            cp = 1
            while memory_gib(seq, cp, world) > 70 and cp < world:
                cp *= 2
            eta = implied_eta(cp)
            compute = flops_tt(seq) / (eta * PEAK)  # seconds per token per GPU-equivalent
            comm = comm_seconds_per_token(seq, cp, doc_mask)
            tps = 1 / max(compute, comm)  # overlapped (ring, Ulysses with async all-to-all); 1/(sum) if not
            out.append((seq, world, cp, "Ulysses" if doc_mask and cp > 1 else ("ring" if cp > 1 else "-"),
                        memory_gib(seq, cp, world), eta, tps, 1 / (compute + comm), comm / compute))
    return out


def main():
    print(f"Llama-3.1-8B: {N_NON_EMBED / 1e9:.2f}B non-embedding parameters; peak {PEAK / 1e12:.0f} TFLOP/s; "
          f"FLOPs_tt/token at 64K {flops_tt(65536):.3g}")
    print("torchtitan-implied efficiency (torchtitan convention): "
          + ", ".join(f"CP{c} {s // 1024}K {implied_eta(c):.1%}" for c, s, _ in TORCHTITAN))
    print()
    print("| row | GPUs | cp (fits 70 GiB) | attention | est. GiB/GPU | eta used | tokens/s/GPU overlapped | "
          "not overlapped | comm / compute |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq, world, cp, att, mem, eta, tps, tps_serial, ratio in rows():
        fits = "" if mem <= 70 else " (over 70 GiB: more GPUs per row, or --cpu-offload)"
        print(f"| {seq // 1024}K | {world} | {cp}{fits} | {att} | {mem:.0f} | {eta:.0%} | {tps:,.0f} | {tps_serial:,.0f} | "
              f"{ratio:.1%} |")
    print()
    print("anchors (tokens/s/GPU): ProLong 64K " + f"{PROLONG[65536]:,.0f} (Table 9) / {PROLONG_TABLE15_64K:,} "
          f"(Table 15); ProLong 512K {PROLONG[524288]:,.0f} (Table 9, SP 8); torchtitan " +
          ", ".join(f"{s // 1024}K CP{c}: {t:,}" for c, s, t in TORCHTITAN))


if __name__ == "__main__":
    main()
