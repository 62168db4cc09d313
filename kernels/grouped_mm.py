"""The routed experts' SwiGLU over rows grouped by expert: the op family `moe_experts`.

Legend: M rows (token-expert assignments, sorted by expert), C model width, F expert width,
E experts; a grouped GEMM multiplies x (M, K) by w (E, K, N). ends_E: one past each expert's
last row, so expert e owns rows ends[e−1]:ends[e] (int64 or int32, on the rows' device).

Every implementation computes, for each row m of expert e with gate weight g_m (1 where none),
    y_m = g_m · (silu(x_m w1[e]) ⊙ (x_m w3[e])) w2[e]
and differs only in how:
- reference: a Python loop over experts, one SwiGLU each (the truth for tests; it reads the
  experts' bounds on the host);
- grouped_mm: three grouped GEMMs through `grouped_mm` below, torch._grouped_mm as a custom op
  (torch 2.13's own meta function takes bf16 only, so torch.compile could not trace fp32): no
  host sync, traces whole in every dtype;
- padded_bmm: every expert's rows zero-padded to the busiest expert's count, one torch.bmm per
  GEMM; reads max(count) on the host (a GPU sync, a graph break): eager only;
- expert_loop: the SwiGLU of one expert at a time with a hand-written backward, so each
  expert's hidden rows are made and used while they sit in cache and only h1, h3 are kept for
  the backward (CPU, eager: it reads the bounds on the host).
The gate weight multiplies the narrower of the hidden (F) and the output (C): it is linear in
both, so the product is the same up to rounding, and the narrower costs less.

`auto` (kernels/choice.py) measures forward and backward where the call trains. Its key holds
the padding bucket, the power of two at or above E·max(count) ÷ M (the rows padded_bmm
multiplies ÷ those the others do), read on CPUs only: on a GPU reading it would sync every call,
so there the key leaves it out and grouped_mm, where it runs, is the only candidate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import choice

# ---------------------------------------------------------------------------------------------
# One grouped GEMM, torch._grouped_mm as a custom op with a fake and an autograd formula


def _align(n: int, dtype: torch.dtype) -> int:
    """n rounded up so that n elements are a multiple of 16 bytes (torch._grouped_mm's strides)."""
    per = max(16 // torch.empty((), dtype=dtype).element_size(), 1)
    return -(-n // per) * per


def _pad_last(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[-1] == n else F.pad(t, (0, n - t.shape[-1]))


@torch.library.custom_op("dsbench::grouped_mm", mutates_args=())
def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Rows ends[e−1]:ends[e] of x times w[e] for every expert e: (M, K) × (E, K, N) → (M, N).

    Widths that are not a multiple of 16 bytes are zero-padded for the kernel and cut back."""
    (M, K), N = x_MK.shape, w_EKN.shape[-1]
    Kp, Np = _align(K, x_MK.dtype), _align(N, x_MK.dtype)
    x = _pad_last(x_MK, Kp).contiguous()
    w = w_EKN if (Kp, Np) == (K, N) else F.pad(w_EKN, (0, Np - N, 0, Kp - K))
    if w.stride(-1) != 1 and w.stride(-2) != 1:
        w = w.contiguous()
    out = torch._grouped_mm(x, w, offs=ends_E.to(torch.int32))
    return out if Np == N else out[:, :N].contiguous()


@grouped_mm.register_fake
def _(x_MK, w_EKN, ends_E):
    return x_MK.new_empty((x_MK.shape[0], w_EKN.shape[-1]))


@torch.library.custom_op("dsbench::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x_MK: torch.Tensor, dy_MN: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """dW[e] = x[rows of e]ᵀ · dy[rows of e]: (M, K) and (M, N) → (E, K, N); an expert without rows
    gets zeros (torch._grouped_mm's 2D × 2D form, offsets along the contraction)."""
    (M, K), N = x_MK.shape, dy_MN.shape[1]
    Kp, Np = _align(K, x_MK.dtype), _align(N, x_MK.dtype)
    x, dy = _pad_last(x_MK, Kp).contiguous(), _pad_last(dy_MN, Np).contiguous()
    out = torch._grouped_mm(x.t(), dy, offs=ends_E.to(torch.int32))
    return out if (Kp, Np) == (K, N) else out[:, :K, :N].contiguous()


@grouped_mm_wgrad.register_fake
def _(x_MK, dy_MN, ends_E):
    return x_MK.new_empty((ends_E.shape[0], x_MK.shape[1], dy_MN.shape[1]))


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x_MK, w_EKN, ends_E = inputs
    ctx.save_for_backward(x_MK if w_EKN.requires_grad else None, w_EKN if x_MK.requires_grad else None, ends_E)


def _grouped_mm_backward(ctx, dy_MN):
    x_MK, w_EKN, ends_E = ctx.saved_tensors
    dx = grouped_mm(dy_MN.contiguous(), w_EKN.transpose(1, 2), ends_E) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_wgrad(x_MK, dy_MN.contiguous(), ends_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


# ---------------------------------------------------------------------------------------------
# The implementations: (x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M=None, limit=None) → y_MC


def swiglu(h1: torch.Tensor, h3: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(gate) ⊙ up; with a limit, the gate clamped above and the up both sides first
    (DeepSeek-V4's swiglu_limit, as HF DeepseekV4Experts._apply_gate)."""
    if limit is None:
        return F.silu(h1) * h3
    return F.silu(h1.clamp(max=limit)) * h3.clamp(min=-limit, max=limit)


def _gate(h: torch.Tensor, weight_M: torch.Tensor | None) -> torch.Tensor:
    return h if weight_M is None else h * weight_M[:, None]


def _weight_hidden(w1_ECF: torch.Tensor, w2_EFC: torch.Tensor) -> bool:
    """Whether the gate weight multiplies the hidden rows (F ≤ C) rather than the outputs."""
    return w1_ECF.shape[2] <= w2_EFC.shape[2]


def _bounds(ends_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = [0, *ends_E.tolist()]  # on the host
    return list(zip(ends[:-1], ends[1:]))


def experts_reference(x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M=None, limit=None) -> torch.Tensor:
    """The naive loop: each expert's rows through its SwiGLU, times their gate weights (an expert
    without rows too, so every weight is in the graph and gets its zero gradient)."""
    out = []
    for e, (s, t) in enumerate(_bounds(ends_E)):
        x = x_MC[s:t]
        y = swiglu(x @ w1_ECF[e], x @ w3_ECF[e], limit) @ w2_EFC[e]
        out.append(y if weight_M is None else y * weight_M[s:t, None])
    return torch.cat(out) if out else x_MC.new_zeros(0, w2_EFC.shape[2])


def experts_grouped_mm(x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M=None, limit=None) -> torch.Tensor:
    hidden_MF = swiglu(grouped_mm(x_MC, w1_ECF, ends_E), grouped_mm(x_MC, w3_ECF, ends_E), limit)
    if _weight_hidden(w1_ECF, w2_EFC):
        return grouped_mm(_gate(hidden_MF, weight_M), w2_EFC, ends_E)
    return _gate(grouped_mm(hidden_MF, w2_EFC, ends_E), weight_M)


def padded_bmm(x_MK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """grouped_mm's rows by one torch.bmm over every expert's rows zero-padded to the busiest's."""
    E = w_EKN.shape[0]
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    starts_E = ends_E - counts_E
    expert_M = torch.repeat_interleave(torch.arange(E, device=x_MK.device), counts_E, output_size=x_MK.shape[0])
    slot_M = torch.arange(x_MK.shape[0], device=x_MK.device) - starts_E[expert_M]
    capacity = int(counts_E.max()) if E else 0  # on the host
    padded_ECK = x_MK.new_zeros(E, capacity, x_MK.shape[1])
    padded_ECK[expert_M, slot_M] = x_MK
    return torch.bmm(padded_ECK, w_EKN)[expert_M, slot_M]


def experts_padded_bmm(x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M=None, limit=None) -> torch.Tensor:
    hidden_MF = swiglu(padded_bmm(x_MC, w1_ECF, ends_E), padded_bmm(x_MC, w3_ECF, ends_E), limit)
    if _weight_hidden(w1_ECF, w2_EFC):
        return padded_bmm(_gate(hidden_MF, weight_M), w2_EFC, ends_E)
    return _gate(padded_bmm(hidden_MF, w2_EFC, ends_E), weight_M)


@torch.library.custom_op("dsbench::expert_loop", mutates_args=())
def expert_loop(x_MC: torch.Tensor, w1_ECF: torch.Tensor, w3_ECF: torch.Tensor, w2_EFC: torch.Tensor,
                ends_E: torch.Tensor, weight_M: torch.Tensor | None,
                limit: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert at a time: y, and h1 = x·w1, h3 = x·w3 kept for the backward. An opaque op, so
    reading the bounds on the host is no graph break under torch.compile (CPU: no sync either)."""
    M, F_ = x_MC.shape[0], w1_ECF.shape[2]
    h1_MF, h3_MF, y_MC = x_MC.new_empty(M, F_), x_MC.new_empty(M, F_), x_MC.new_empty(M, w2_EFC.shape[2])
    for e, (s, t) in enumerate(_bounds(ends_E)):
        if t > s:
            x = x_MC[s:t]
            h1, h3 = torch.mm(x, w1_ECF[e], out=h1_MF[s:t]), torch.mm(x, w3_ECF[e], out=h3_MF[s:t])
            a = swiglu(h1, h3, limit)
            if weight_M is not None:
                a.mul_(weight_M[s:t, None])
            torch.mm(a, w2_EFC[e], out=y_MC[s:t])
    return y_MC, h1_MF, h3_MF


@expert_loop.register_fake
def _(x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M, limit):
    M, F_ = x_MC.shape[0], w1_ECF.shape[2]
    return x_MC.new_empty(M, w2_EFC.shape[2]), x_MC.new_empty(M, F_), x_MC.new_empty(M, F_)


@torch.library.custom_op("dsbench::expert_loop_backward", mutates_args=())
def expert_loop_backward(dy_MC: torch.Tensor, x_MC: torch.Tensor, w1_ECF: torch.Tensor, w3_ECF: torch.Tensor,
                         w2_EFC: torch.Tensor, ends_E: torch.Tensor, weight_M: torch.Tensor | None,
                         h1_MF: torch.Tensor, h3_MF: torch.Tensor, limit: float | None) -> list[torch.Tensor]:
    """dx, dw1, dw3, dw2 and the gate weights' gradient (empty where there is no gate weight)."""
    dx_MC = torch.empty_like(x_MC)
    dw1, dw3, dw2 = torch.empty_like(w1_ECF), torch.empty_like(w3_ECF), torch.empty_like(w2_EFC)
    dweight_M = x_MC.new_empty(0) if weight_M is None else torch.empty_like(weight_M)
    dy_MC = dy_MC.contiguous()
    for e, (s, t) in enumerate(_bounds(ends_E)):
        if t == s:
            dw1[e].zero_(), dw3[e].zero_(), dw2[e].zero_()
            continue
        x, dy, h1, h3 = x_MC[s:t], dy_MC[s:t], h1_MF[s:t], h3_MF[s:t]
        if limit is not None:  # the clamped values, and masks of where the clamp passes gradient
            pass1, pass3 = h1 <= limit, (h3 >= -limit) & (h3 <= limit)
            h1, h3 = h1.clamp(max=limit), h3.clamp(min=-limit, max=limit)
        act = F.silu(h1)
        a = act * h3  # the hidden before its gate weight
        g = _rows(weight_M, s, t)
        torch.mm(_gate(a, g).t(), dy, out=dw2[e])
        da = dy @ w2_EFC[e].t()  # d(g·a)
        if g is not None:
            torch.sum(da * a, dim=1, out=dweight_M[s:t])
            da.mul_(g[:, None])
        dh3 = da * act
        dh1 = torch.ops.aten.silu_backward(da.mul_(h3), h1)
        if limit is not None:
            dh1.mul_(pass1), dh3.mul_(pass3)
        torch.mm(dh1, w1_ECF[e].t(), out=dx_MC[s:t]).addmm_(dh3, w3_ECF[e].t())
        torch.mm(x.t(), dh1, out=dw1[e]), torch.mm(x.t(), dh3, out=dw3[e])
    return [dx_MC, dw1, dw3, dw2, dweight_M]


@expert_loop_backward.register_fake
def _(dy_MC, x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M, h1_MF, h3_MF, limit):
    dweight_M = x_MC.new_empty(0) if weight_M is None else torch.empty_like(weight_M)
    return [torch.empty_like(x_MC), torch.empty_like(w1_ECF), torch.empty_like(w3_ECF), torch.empty_like(w2_EFC), dweight_M]


def _expert_loop_setup(ctx, inputs, output) -> None:
    x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M, limit = inputs
    ctx.has_weight, ctx.limit = weight_M is not None, limit
    ctx.save_for_backward(x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M, output[1], output[2])


def _expert_loop_autograd(ctx, dy_MC, _dh1, _dh3):
    x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M, h1_MF, h3_MF = ctx.saved_tensors
    dx, dw1, dw3, dw2, dweight = expert_loop_backward(dy_MC, x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E,
                                                      weight_M if ctx.has_weight else None, h1_MF, h3_MF, ctx.limit)
    return dx, dw1, dw3, dw2, None, dweight if ctx.has_weight else None, None


expert_loop.register_autograd(_expert_loop_autograd, setup_context=_expert_loop_setup)


def _rows(weight_M: torch.Tensor | None, s: int, t: int) -> torch.Tensor | None:
    return None if weight_M is None else weight_M[s:t]


def experts_loop(x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M=None, limit=None) -> torch.Tensor:
    return expert_loop(x_MC.contiguous(), w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M, limit)[0]


# ---------------------------------------------------------------------------------------------
# The op family


def grouped_mm_runs(x: torch.Tensor) -> str | None:
    """Why torch._grouped_mm cannot run on rows like x, or None (no sync: device and dtype only)."""
    if x.device.type == "cpu":
        return None
    if x.device.type != "cuda":
        return f"torch._grouped_mm has no {x.device.type} kernel"
    if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
        return "on CUDA torch._grouped_mm needs bf16 and compute capability ≥ 9.0"
    return None


def _host_reads(what: str):
    """runs_on for an implementation that reads the expert bounds on the host: not under
    torch.compile (a graph break), and not on a GPU where grouped_mm runs (a sync every call)."""

    def runs_on(x_MC, *args, **kwargs) -> str | None:
        if torch.compiler.is_compiling():
            return f"reads {what} on the host: a graph break under torch.compile"
        if x_MC.device.type != "cpu" and grouped_mm_runs(x_MC) is None:
            return f"reads {what} on the host, a GPU sync every call, and grouped_mm runs here"
        return None

    return runs_on


def _loop_runs(x_MC, *args, **kwargs) -> str | None:
    """A CPU path; an opaque op, so it reads the bounds on the host without a graph break."""
    if x_MC.device.type != "cpu":
        return "a CPU path: on a GPU its per-expert launches and host bounds lose to grouped_mm"
    return None


def _rows_bucket(n_rows: int) -> int:
    """The power of two at or above n_rows: row counts within a factor of 2 share a pick."""
    return 1 << max(n_rows - 1, 0).bit_length()


def padding_bucket(ends_E: torch.Tensor, n_rows: int) -> int:
    """The power of two at or above E·max(count) ÷ M: padded_bmm's rows ÷ the others' (CPU: no sync)."""
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    pad = math.ceil(counts_E.numel() * int(counts_E.max()) / max(n_rows, 1)) if counts_E.numel() else 1
    return _rows_bucket(pad)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _key(x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M=None, limit=None) -> tuple:
    """What the winner depends on: device, dtype, shapes, rows bucket, backward or not, gate
    weight or not, and on a CPU the padding bucket (the same shapes flip winner as the load skews)."""
    key = (x_MC.device.type, x_MC.dtype, *w1_ECF.shape, _rows_bucket(x_MC.shape[0]),
           _needs_grad(x_MC, w1_ECF, w3_ECF, w2_EFC, weight_M), weight_M is None)
    return (*key, padding_bucket(ends_E, x_MC.shape[0])) if x_MC.device.type == "cpu" else key


def _trial(fn, x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M=None, limit=None) -> None:
    """One timed call: forward, and backward into fresh leaves where the call trains."""
    if not _needs_grad(x_MC, w1_ECF, w3_ECF, w2_EFC, weight_M):
        with torch.no_grad():
            fn(x_MC, w1_ECF, w3_ECF, w2_EFC, ends_E, weight_M, limit)
        return
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in (x_MC, w1_ECF, w3_ECF, w2_EFC)]
    weight = None if weight_M is None else weight_M.detach().requires_grad_(weight_M.requires_grad)
    out = fn(*leaves, ends_E, weight, limit)
    if out.requires_grad:
        out.backward(torch.ones_like(out))


def _tolerance(x_MC, *args, **kwargs) -> float:
    # fp32: the same products summed in another order (RMS-relative 1e-5); bf16: the hidden rows
    # rounded to bf16 at other points (2⁻⁸ each) and the gate weight applied before or after w2.
    return 1e-5 if x_MC.dtype == torch.float32 else 2e-2


MOE_EXPERTS = choice.register(choice.Family(
    name="moe_experts",
    reference="reference",
    implementations={
        "reference": choice.Implementation("reference", experts_reference, _host_reads("the experts' bounds"),
                                           note="a Python loop over experts, one SwiGLU each"),
        "grouped_mm": choice.Implementation("grouped_mm", experts_grouped_mm, lambda x, *a, **k: grouped_mm_runs(x),
                                            lambda device: None if device in ("cpu", "cuda") else f"no {device} kernel",
                                            note="three torch._grouped_mm (a custom op: traces in fp32 too), no host sync"),
        "padded_bmm": choice.Implementation("padded_bmm", experts_padded_bmm, _host_reads("max(count)"),
                                            note="rows zero-padded to the busiest expert's, one torch.bmm per GEMM"),
        "expert_loop": choice.Implementation("expert_loop", experts_loop, _loop_runs,
                                             lambda device: None if device == "cpu" else "CPU only",
                                             note="one expert's SwiGLU at a time, cache-resident, hand-written backward"),
    },
    key=_key,
    tolerance=_tolerance,
    compile_order=("expert_loop", "grouped_mm"),  # expert_loop: CPU only
    trial=lambda fn, needs_grad, *args: _trial(fn, *args),  # the call's own tensors say whether it trains
    description="the routed experts' gate-weighted SwiGLU over rows sorted by expert",
))
