"""Where one DSA decode step's time goes, stage by stage, on one attention layer (MLA's layer
beside it), and what bounds the stages that the FLOP count leaves out (top-k, gather).

    OMP_NUM_THREADS=1 python scripts/dsa_profile.py --size debug --contexts 4096 16384
    OMP_NUM_THREADS=1 python scripts/dsa_profile.py --size small --contexts 2896 4096 5793 \\
        --attention n_heads=16 kv_lora_rank=512 qk_rope_head_dim=64 index_n_heads=8 index_head_dim=128
    OMP_NUM_THREADS=1 python scripts/dsa_profile.py --families     # each op family's implementations

The caches are filled with random latent rows and the indexer keys of random hidden states (no
prefill: a decode step reads the cache, not how it was written). Stages, each timed alone (its
inputs hot in cache, so a lower bound of its share inside a step), and the whole layer's forward
(mla and dsa alternating, so each starts with the other's data in cache, as layers do in a model):
  indexer proj   the indexer's q, k, w for the new token and its key-cache write
  scores         I(t, s) over every cached key           (family dsa_index_scores)
  top-k          the selection                            (family dsa_topk)
  attention      gather + the two matmuls over K rows     (family dsa_attention)
Times: median of `--reps` alternating rounds (p10 beside it), µs. It runs against whichever
dsbench is importable: the stage calls of the code before the op families are used where the
families do not exist (PYTHONPATH at an older checkout profiles that one).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dsbench.variants import dsa, lightning_indexer
from dsbench.variants.config import config_from_size
from dsbench.variants.decoder import build_model

def families_exist() -> bool:
    try:
        from dsbench.kernels import families
    except ImportError:
        return False
    return "dsa_topk" in getattr(families, "MODULES", {})


def layer(kind: str, size: str, context: int, attention: dict):
    keys = {k: v for k, v in attention.items() if kind == "dsa" or not k.startswith("index")}
    cfg = config_from_size(size, kind, "dense", max_seq_len=context + 64, **keys)
    torch.manual_seed(0)
    attn = build_model(cfg).eval().blocks[0].attn
    cache = attn.new_cache(1, context + 64, torch.float32, "cpu")
    with torch.no_grad():
        cache.kv[:, :context] = torch.randn(1, context, cache.kv.shape[-1])
        if kind == "dsa":
            for t0 in range(0, context, 2048):
                h = torch.randn(1, min(2048, context - t0), cfg.d_model)
                cache.update_index(t0, attn.indexer.keys(h, t0))
    return attn, cache, cfg


def timed(fns: dict, reps: int) -> dict[str, tuple[float, float]]:
    """{name: (median µs, p10 µs)} over `reps` rounds, the order alternating round by round."""
    names = list(fns)
    for name in names:  # warm-up (and auto's one measurement per key)
        for _ in range(3):
            fns[name]()
    samples = {n: [] for n in names}
    for r in range(reps):
        for name in names if r % 2 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {n: (1e6 * sorted(v)[len(v) // 2], 1e6 * sorted(v)[len(v) // 10]) for n, v in samples.items()}


def stages(attn, cache, context: int, x: torch.Tensor) -> dict:
    """The stage calls of one decode step at position `context` (inputs computed once)."""
    ix, K, new = attn.indexer, attn.K, families_exist()
    with torch.no_grad():
        if new:
            keys, q_idx, w_idx = ix.project(x, x, context)
        else:
            keys, (q_idx, w_idx) = ix.keys(x, context), ix.queries(x, x, context)
        k_all = ix.key_values(cache.update_index(context, keys))
        kv = attn._latent_rows(x, context, cache)
        q = attn._latent_queries(x, context)
        rows = kv.new_empty(K, kv.shape[-1])
        logits = k_all.new_empty(ix.dims.n * kv.shape[1])
        if new:
            from dsbench.kernels import choice

            score = lambda: choice.run("dsa_index_scores", q_idx, w_idx, k_all, buffer=logits)  # noqa: E731
            scores = score()
            topk = lambda: choice.run("dsa_topk", scores, context, K)  # noqa: E731
            idx, valid = topk()
            attend = lambda: choice.run("dsa_attention", q, kv, idx, None, attn.scale, attn.dims.Dc, buffer=rows)  # noqa: E731
            proj = lambda: ix.key_values(cache.update_index(context, ix.project(x, x, context)[0]))  # noqa: E731
        else:
            score = lambda: ix.score(q_idx, w_idx, k_all, logits)  # noqa: E731
            scores = score()
            topk = lambda: lightning_indexer.select(scores, context, K)  # noqa: E731
            idx, valid = topk()
            attend = lambda: attn._gathered_chunk(q, kv, idx, valid, rows)  # noqa: E731
            proj = lambda: (ix.key_values(cache.update_index(context, ix.keys(x, context))), ix.queries(x, x, context))  # noqa: E731
    return {"indexer proj": proj, "scores": score, "top-k": topk, "attention": attend}


def bounds(context: int, K: int, width: int, reps: int) -> dict:
    """What the CPU's top-k and gather cost against a copy of the same bytes."""
    scores, kv = torch.randn(1, 1, context), torch.randn(context, width)
    idx = torch.randperm(context)[:K].sort().values
    rows, copy_dst, score_dst = torch.empty(K, width), torch.empty(K, width), torch.empty(1, 1, context)
    t = timed({"topk": lambda: scores.topk(K, dim=-1, sorted=False), "copy scores": lambda: score_dst.copy_(scores),
               "gather": lambda: torch.index_select(kv, 0, idx, out=rows), "copy rows": lambda: copy_dst.copy_(kv[:K])}, reps)
    return {"topk ns/key": 1e3 * t["topk"][0] / context, "copy ns/key": 1e3 * t["copy scores"][0] / context,
            "gather ns/row": 1e3 * t["gather"][0] / K, "copy ns/row": 1e3 * t["copy rows"][0] / K}


def families_table() -> None:
    """Each DSA op family's implementations against its reference, decoding (1 query) and on a
    prefill chunk (256 queries), at the debug model's dims: µs, median."""
    from dsbench.kernels import dsa_attention as da, dsa_indexer as di

    def us(fn, reps):
        return timed({"f": fn}, reps)["f"][0]

    n, D, H, C, Dc, K = 4, 32, 4, 72, 64, 2048
    print("| queries | keys | scores reference / blocked | top-k reference / threshold | attention reference / blocked |")
    print("|---|---|---|---|---|")
    for T, S in ((1, 4096), (1, 16384), (256, 4096), (256, 16384)):
        reps = 60 if T == 1 else 7
        gen = torch.Generator().manual_seed(0)
        q, w, k = torch.randn(1, n, T, D, generator=gen), torch.randn(1, T, n, generator=gen), torch.randn(1, S, D, generator=gen)
        buffer = torch.empty(T * n * S)
        scores = di.scores_reference(q, w, k, buffer).clone()
        idx, _ = di.select_reference(scores, S - T, K)
        qa, kv, rows = torch.randn(1, H, T, C, generator=gen), torch.randn(1, S, C, generator=gen), torch.empty(T * K, C)
        t = [us(lambda: di.scores_reference(q, w, k, buffer), reps), us(lambda: di.scores_blocked(q, w, k), reps),
             us(lambda: di.select_reference(scores, S - T, K), reps), us(lambda: di.select_threshold(scores, S - T, K), reps),
             us(lambda: da.attention_reference(qa, kv, idx, None, 0.1, Dc, buffer=rows), reps),
             us(lambda: da.attention_blocked(qa, kv, idx, None, 0.1, Dc, buffer=rows), reps)]
        print(f"| {T} | {S} | " + " | ".join(f"{t[i]:.0f} / {t[i + 1]:.0f}" for i in (0, 2, 4)) + " |")
    print(f"\nµs, median; n {n} × D {D} indexer, H {H}, latent {Dc} + {C - Dc}, K {K}; the indexer's scores as the top-k's input")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="debug")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--attention", nargs="*", default=[], help="key=value attention fields (index_topk defaults to 2048)")
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--families", action="store_true", help="each op family's implementations instead (kernels/dsa_*.py)")
    args = parser.parse_args(argv)
    if args.families:
        families_table()
        return 0
    attention = {"index_topk": 2048, "index_n_heads": 4, "index_head_dim": 32}
    attention.update({k: int(v) for k, v in (a.split("=") for a in args.attention)})
    code = "op families (kernels/dsa_*.py)" if families_exist() else "before the op families"
    print(f"dsbench at {dsa.__file__} ({code}); torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"size {args.size}, {attention}\n")
    print("| context | mla layer | dsa layer | dsa ÷ mla | indexer proj | scores | top-k | attention | topk ns/key (copy) | gather ns/row (copy) |")
    print("|---" * 10 + "|")
    for context in args.contexts:
        (m, m_cache, cfg), (d, d_cache, _) = layer("mla", args.size, context, attention), layer("dsa", args.size, context, attention)
        x = torch.randn(1, 1, cfg.d_model)
        with torch.no_grad():
            whole = timed({"mla": lambda: m(x, context, m_cache), "dsa": lambda: d(x, context, d_cache)}, args.reps)
            parts = timed(stages(d, d_cache, context, x), args.reps)
        b = bounds(context, attention["index_topk"], d.dims.Dc + d.dims.Dr, args.reps)
        cell = lambda v: f"{v[0]:.0f} ({v[1]:.0f})"  # noqa: E731
        print(f"| {context} | {cell(whole['mla'])} | {cell(whole['dsa'])} | {whole['dsa'][0] / whole['mla'][0]:.2f} | "
              + " | ".join(cell(parts[s]) for s in ("indexer proj", "scores", "top-k", "attention"))
              + f" | {b['topk ns/key']:.1f} ({b['copy ns/key']:.2f}) | {b['gather ns/row']:.0f} ({b['copy ns/row']:.0f}) |")
    print("\nµs per decode step of one layer: median (p10) of alternating rounds; the stages timed alone.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
