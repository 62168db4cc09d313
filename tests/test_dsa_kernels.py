"""DSA's op families (kernels/dsa_indexer.py, kernels/dsa_attention.py): every implementation
against its reference on odd shapes, bit for bit (each family's stated tolerance is 0: the same
sums in the same order), top-k ties that straddle the K-th place, NaN scores, queries with fewer
than K keys; the module's fused projection against keys() and queries(); the unpadded FP8
dequantisation; auto's pick through kernels/choice.py, and what it loads. CPU, fp32."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsbench.kernels import choice, dsa_attention, dsa_indexer
from dsbench.variants import lightning_indexer
from dsbench.variants.config import config_from_size
from dsbench.variants.decoder import build_model

FAMILIES = ("dsa_index_scores", "dsa_topk", "dsa_attention")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def impls(name: str) -> list[str]:
    fam = choice.family(name)
    return [n for n in fam.implementations if n != fam.reference]


# --- dsa_index_scores ---


@pytest.mark.parametrize("B, n, T, D, S", [(1, 4, 1, 32, 4099), (2, 3, 7, 24, 1031), (1, 5, 63, 40, 896), (3, 1, 2, 8, 513)])
def test_index_scores_are_the_references_bits(B, n, T, D, S):
    q, w, k = (torch.randn(B, n, T, D, generator=gen(1)), torch.randn(B, T, n, generator=gen(2)), torch.randn(B, S, D, generator=gen(3)))
    ref = dsa_indexer.scores_reference(q, w, k)
    for name in impls("dsa_index_scores"):
        assert torch.equal(choice.family("dsa_index_scores").implementations[name].fn(q, w, k), ref), name
    buffer = torch.empty(B * T * n * S + 5)  # a reused, larger buffer changes nothing
    assert torch.equal(dsa_indexer.scores_reference(q, w, k, buffer), ref)


def test_index_scores_with_v32s_64_heads_are_the_reference_to_an_ulp():
    """With n = 64, MKL's M = 1 kernel (Σ_j w_j·ReLU(·)) peels its first columns by alignment, so a
    block's sum over 64 heads may round differently (the family's tolerance 0 then keeps auto on
    the reference); the products and the values are the same."""
    q, w = torch.randn(1, 64, 16, 128, generator=gen(1)), torch.randn(1, 16, 64, generator=gen(2))
    k = torch.randn(1, 4099, 128, generator=gen(3))
    ref = dsa_indexer.scores_reference(q, w, k)
    assert choice.rms_relative_error(dsa_indexer.scores_blocked(q, w, k), ref) < 2 ** -22


def test_index_scores_reference_is_the_direct_sum():
    B, n, T, D, S = 1, 3, 5, 8, 9
    q, w, k = torch.randn(B, n, T, D), torch.randn(B, T, n), torch.randn(B, S, D)
    direct = torch.einsum("btj,bjts->bts", w, torch.relu(torch.einsum("bjtd,bsd->bjts", q, k)))
    torch.testing.assert_close(dsa_indexer.scores_reference(q, w, k), direct)


# --- dsa_topk ---


def topk_cases():
    """(scores, start_pos, K): decode, prefill chunks, few keys, heavy ties, NaN."""
    yield torch.randn(1, 1, 4099, generator=gen(4)), 4098, 2048  # decode: every key causal
    yield torch.randn(2, 7, 1031, generator=gen(5)), 1024, 63  # a prefill chunk's last queries
    yield torch.randn(1, 63, 896, generator=gen(6)), 833, 200
    yield torch.randn(2, 9, 40, generator=gen(7)), 0, 16  # early queries: fewer than K causal keys, masked picks
    yield torch.randint(0, 4, (2, 5, 517), generator=gen(8)).float(), 512, 100  # ties straddle the K-th place in every row
    yield torch.randint(0, 3, (1, 1, 301), generator=gen(9)).float(), 300, 7
    ties_in_one_row = torch.randn(1, 4, 700, generator=gen(10))
    ties_in_one_row[0, 2, :350] = 5.0
    yield ties_in_one_row, 696, 64  # only one row ties: the threshold path hands it, alone, to the tie rule
    nan = torch.randn(1, 3, 300, generator=gen(11))
    nan[0, 1, 17] = float("nan")
    yield nan, 297, 31


@pytest.mark.parametrize("case", range(8))
def test_topk_is_the_references_selection(case):
    scores, start_pos, K = list(topk_cases())[case]
    ref_idx, ref_valid = dsa_indexer.select_reference(scores, start_pos, K)
    for name in impls("dsa_topk"):
        idx, valid = choice.family("dsa_topk").implementations[name].fn(scores, start_pos, K)
        assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid), name


def test_topk_reference_ties_go_to_the_lower_positions_and_indices_ascend():
    scores = torch.tensor([[[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]]])
    idx, valid = dsa_indexer.select_reference(scores, 5, 3)
    assert idx.tolist() == [[[0, 2, 3]]] and bool(valid.all())


def test_threshold_masks_only_the_columns_a_query_can_have_in_its_future():
    scores = torch.arange(12.0).view(1, 3, 4)
    q_pos = torch.arange(1, 4)[:, None]
    masked = dsa_indexer.causal_masked(scores, 1, q_pos)
    full = scores.masked_fill(torch.arange(4)[None, :] > q_pos, float("-inf"))
    assert torch.equal(masked, full) and masked.data_ptr() != scores.data_ptr()
    decode = torch.randn(1, 1, 9)
    assert dsa_indexer.causal_masked(decode, 8, torch.tensor([[8]])) is decode  # decoding: no future, no copy


# --- dsa_attention ---


@pytest.mark.parametrize("B, H, t, C, Dc, S, K", [(1, 4, 1, 72, 64, 4099, 2048), (2, 3, 17, 40, 32, 1031, 63), (1, 5, 63, 24, 16, 896, 200),
                                                  (2, 2, 9, 12, 8, 40, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_is_the_references_bits(B, H, t, C, Dc, S, K, masked):
    q, kv = torch.randn(B, H, t, C, generator=gen(12)), torch.randn(B, S, C, generator=gen(13))
    idx = torch.stack([torch.stack([torch.randperm(S, generator=gen(100 * b + i))[:K].sort().values for i in range(t)]) for b in range(B)])
    valid = torch.rand(B, t, K, generator=gen(14)) > 0.1 if masked else None
    if valid is not None:
        valid[..., 0] = True  # a query keeps at least one key
    ref_o, ref_p = dsa_attention.attention_reference(q, kv, idx, valid, 0.125, Dc, need_probs=True)
    for name in impls("dsa_attention"):
        o, p = choice.family("dsa_attention").implementations[name].fn(q, kv, idx, valid, 0.125, Dc, need_probs=True,
                                                                       buffer=torch.empty(B * t * K + 3, C))
        assert torch.equal(o, ref_o) and torch.equal(p, ref_p), name
    # valid None is the all-true mask
    everything = torch.ones(B, t, K, dtype=torch.bool)
    assert torch.equal(dsa_attention.attention_reference(q, kv, idx, None, 0.125, Dc)[0],
                       dsa_attention.attention_reference(q, kv, idx, everything, 0.125, Dc)[0])


def test_attention_reference_is_softmax_over_the_gathered_rows():
    B, H, t, C, Dc, S = 1, 2, 3, 6, 4, 10
    q, kv = torch.randn(B, H, t, C), torch.randn(B, S, C)
    idx = torch.tensor([[[0, 3, 5, 9], [1, 2, 3, 4], [6, 7, 8, 9]]])
    o, _ = dsa_attention.attention_reference(q, kv, idx, None, 0.5, Dc)
    for i in range(t):
        rows = kv[0, idx[0, i]]  # (4, C)
        expected = ((q[0, :, i] @ rows.T) * 0.5).softmax(-1) @ rows[:, :Dc]
        torch.testing.assert_close(o[0, :, i], expected)


def test_blocked_forms_do_not_run_under_autograd():
    """Their forward is the reference's bits; their backward would add gradients up block by block."""
    q = torch.randn(1, 2, 9, 8, requires_grad=True)
    kv, idx = torch.randn(1, 20, 8), torch.arange(4).expand(1, 9, 4)
    with pytest.raises(choice.KernelUnavailable, match="under autograd"):
        choice.Chooser(pins={"dsa_attention": "blocked"}).run("dsa_attention", q, kv, idx, None, 0.5, 4)
    with pytest.raises(choice.KernelUnavailable, match="under autograd"):
        choice.Chooser(pins={"dsa_index_scores": "blocked"}).run("dsa_index_scores", torch.randn(1, 2, 3, 8, requires_grad=True),
                                                                 torch.randn(1, 3, 2), torch.randn(1, 600, 8))
    with torch.no_grad():
        o, _ = choice.Chooser(pins={"dsa_attention": "blocked"}).run("dsa_attention", q, kv, idx, None, 0.5, 4)
    assert o.shape == (1, 2, 9, 4)


# --- through the chooser, and in the module ---


def test_auto_picks_an_implementation_that_agrees_and_says_why():
    chooser = choice.Chooser()
    scores = torch.randn(1, 1, 3001)
    with torch.no_grad():
        idx, valid = chooser.run("dsa_topk", scores, 3000, 256)
    assert torch.equal(idx, dsa_indexer.select_reference(scores, 3000, 256)[0])
    row = chooser.columns()
    assert row["kernel_dsa_topk"] in ("reference", "threshold") and "auto: " in row["kernel_dsa_topk_why"]
    assert "threshold" in row["kernel_dsa_topk_why"] and "reference" in row["kernel_dsa_topk_why"]


def test_nothing_is_measured_under_a_dispatch_mode():
    chooser = choice.Chooser()
    with FlopCounterMode(display=False):
        chooser.run("dsa_topk", torch.randn(1, 1, 301), 300, 8)
    assert chooser.decisions == {} and chooser.ran == {"dsa_topk": {"reference"}}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_project_is_keys_and_queries_in_one_rope(precision):
    import dataclasses

    cfg = config_from_size("debug", "dsa", "dense", index_topk=8, q_lora_rank=32)
    cfg = dataclasses.replace(cfg, precision=precision) if precision != "fp32" else cfg
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    attn = build_model(cfg).eval().to(dtype).blocks[0].attn
    x = torch.randn(2, 7, 64, dtype=dtype)
    with torch.no_grad():
        q_in = attn.q_norm(attn.wq_a(x))
        keys, q, w = attn.indexer.project(q_in, x, 5)
        q_ref, w_ref = attn.indexer.queries(q_in, x, 5)
        keys_ref = attn.indexer.keys(x, 5)
    as_tuple = lambda keys: keys if isinstance(keys, tuple) else (keys,)  # noqa: E731  (fp8: E4M3 keys and their scales)
    for got, ref in zip((*as_tuple(keys), q, w), (*as_tuple(keys_ref), q_ref, w_ref)):
        assert got.dtype == ref.dtype and got.is_contiguous() == ref.is_contiguous()
        assert torch.equal(got.float(), ref.float())


@pytest.mark.parametrize("D", [24, 32, 128, 200, 256])
def test_dequant_rows_is_the_padded_formula_without_the_padding(D):
    import torch.nn.functional as F

    from dsbench.kernels.fp8_quant import to_float

    q, scale = lightning_indexer.quant_ue8m0(torch.randn(2, 5, D) * 30)
    tiles = F.pad(to_float(q), (0, -D % lightning_indexer.GROUP)).unflatten(-1, (-1, lightning_indexer.GROUP))
    assert torch.equal(lightning_indexer.dequant_rows(q, scale), (tiles * scale[..., None]).flatten(-2)[..., :D])


@pytest.mark.parametrize("pins", [{}, {f: "reference" for f in FAMILIES}, {"dsa_index_scores": "blocked", "dsa_topk": "threshold",
                                                                           "dsa_attention": "blocked"}])
def test_a_forward_is_the_same_bits_whichever_implementation_runs(pins):
    cfg = config_from_size("debug", "dsa", "dense", index_topk=37, max_seq_len=1100)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    x = torch.randint(0, 256, (2, 1030), generator=gen(15))
    with torch.no_grad(), choice.use(choice.Chooser(pins={f: "reference" for f in FAMILIES})):
        ref = m(x)
    with torch.no_grad(), choice.use(choice.Chooser(pins=pins)):
        assert torch.equal(m(x), ref)


def test_families_load_one_kernel_file_and_dsa_leaves_triton_unloaded():
    code = ("import sys, torch; from dsbench.kernels import choice; "
            "[choice.family(f) for f in ('dsa_index_scores', 'dsa_topk', 'dsa_attention')]; print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    assert choice.check_pins({f: "auto" for f in FAMILIES}, "cpu") is None and {"fp8_gemm", *FAMILIES} <= set(choice.FAMILIES)
