"""Routed FFNs: classic top-k MoE (GShard) and DeepSeekMoE (fine-grained + shared experts).

Both are one layer, `MoEFeedForward`, cut from the same dense SwiGLU base of width d_ff
(variants/config.py FFNConfig):
- `moe` (GShard, Lepikhin et al. 2006.16668): N experts of width d_ff/K, top-K (K = 2), so the
  K active experts hold exactly the dense FFN's d_ff.
- `deepseekmoe` (DeepSeekMoE 2401.06066 §3): each expert split into m (fine-grained expert
  segmentation, §3.1), giving mN experts of width d_ff/(Km) with mK active; K_s of them are
  isolated as shared experts that every token uses (§3.2), leaving mN − K_s routed, mK − K_s
  active. Expert parameters total and activated are therefore identical to `moe`; only the
  gate differs (C per routed expert).

The layer is router (router.py) → dispatch (dispatch.py) → grouped experts (experts.py) →
combine; this file holds the configs, their layout and checks, and the layer.

Legend: N tokens (batch × seq, flattened), C model width, E routed experts, K routed experts per
token, F expert width, G expert groups, D data domains. Suffixes give shapes: scores_NE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .balance import (
    RoutingStats,
    per_token_share,
    device_balance_loss,
    expert_balance_loss,
    sequence_balance_loss,
    update_bias,
)
from dsbench.metrics import Metric, variant_column

from . import expert_parallel
from .base import Activations, FeedForward, Layout, PartConfig, PartCost, PassShape, add_cost, at_least, choices
from .dispatch import Dispatch, gather_rows, plan_dispatch, sum_rows
from .experts import GroupedExperts
from .ffn import DenseFFN, DenseFFNConfig, swiglu_costs, swiglu_inference_activations, swiglu_train_activations
from .precision import precision_of
from .profiling import part
from .router import Router, Routing, uniform_assignment

if TYPE_CHECKING:
    from .config import ModelConfig


@dataclass(frozen=True)
class RoutedFFNConfig(PartConfig):
    """Classic MoE (`moe`): n_experts experts of width d_ff/top_k, so top_k of them activate
    exactly d_ff (the dense width)."""

    kind: str = "moe"
    d_ff: int = 192  # the dense SwiGLU width the experts are cut from
    balance: str = "none"  # load balancing (the balance axis)
    n_experts: int = 16  # N, as DeepSeekMoE 2B (§4.1): 16 experts, top-2
    top_k: int = 2  # K
    first_k_dense: int = at_least(0, 0)  # leading layers that keep the dense FFN
    # v3: sigmoid, normalised, scaled; sqrtsoftplus (DeepSeek-V4): sqrt(softplus), normalised, scaled
    router: str = choices("softmax", "softmax", "sigmoid", "v3", "sqrtsoftplus")
    norm_topk: bool = False  # renormalise the selected gate weights to sum to 1 (v3, sqrtsoftplus force it)
    routed_scale: float = 2.5  # routed scaling factor, used by v3 and sqrtsoftplus (V3 config: 2.5; V4: 1.5)
    n_group: int = 1  # group-limited routing (V3 §2.1.2): experts split into n_group groups…
    topk_group: int = 1  # …of which topk_group are kept per token
    aux_alpha: float = at_least(0.01, 0)  # α1, expert-level balance loss (DeepSeekMoE §3.3)
    aux_device_alpha: float = at_least(0.0, 0)  # α2, device-level balance loss, over n_devices groups
    n_devices: int = 1
    seq_aux_alpha: float = at_least(0.0, 0)  # α, V3's complementary sequence-wise loss (V3 §2.1.2)
    bias_update_rate: float = 0.001  # γ, auxiliary-loss-free bias step (V3 §2.1.2 uses 0.001)
    bias_zero_mean: bool = False  # re-centre the biases after each update (a variant; not in V3)
    swiglu_limit: float = at_least(0.0, 0)  # DeepSeek-V4's clamp of the routed experts' gate/up (V4: 10); 0 = none
    capacity_factor: float = at_least(0.0, 0)  # 0 = dropless; else drop tokens past capacity
    uniform_routing: bool = False  # force a perfectly balanced assignment (best-case throughput)
    # Fields added after cells were recorded: left out of the identity at their default.
    LATE_DEFAULTS: ClassVar[dict] = {"swiglu_limit": 0.0}

    def layout(self) -> Layout:
        return Layout(self.n_experts, self.top_k, self.d_ff // self.top_k, 0, self.n_group)

    def check_split(self) -> str | None:
        return None

    def split_columns(self) -> dict:
        return {"granularity": None, "n_shared": 0}


@dataclass(frozen=True)
class DeepSeekMoEConfig(RoutedFFNConfig):
    """DeepSeekMoE (2401.06066 §3): each classic expert split into `granularity` m experts, and
    n_shared of the m·n_experts isolated as shared experts."""

    kind: str = "deepseekmoe"
    granularity: int = 4  # m: 64 fine-grained experts, 8 activated
    n_shared: int = at_least(1, 0)  # K_s: 1 shared + 7 of 63 routed, as DeepSeekMoE 2B; 0 = none (ablation)

    def layout(self) -> Layout:
        m, fine = self.granularity, self.d_ff // self.top_k // self.granularity
        return Layout(m * self.n_experts - self.n_shared, m * self.top_k - self.n_shared, fine, self.n_shared * fine, self.n_group)

    def check_split(self) -> str | None:
        if (self.d_ff // self.top_k) % self.granularity:
            return f"ffn.granularity: {self.granularity} does not divide the expert width d_ff/top_k = {self.d_ff // self.top_k}"
        if self.n_shared >= self.granularity * self.top_k:
            return f"ffn.n_shared: {self.n_shared} leaves no routed expert of the granularity·top_k = {self.granularity * self.top_k} active"
        return None

    def split_columns(self) -> dict:
        return {"granularity": self.granularity, "n_shared": self.n_shared}


def layout(ffn: RoutedFFNConfig) -> Layout:
    return ffn.layout()


def check_config(cfg: ModelConfig) -> str | None:
    """The first reason this routed FFN cannot be built, as one line naming the fields; else None."""
    f = cfg.ffn
    if f.d_ff % f.top_k:
        return f"ffn.d_ff: {f.d_ff} is not divisible by ffn.top_k {f.top_k} (each classic expert is d_ff/top_k wide)"
    if f.top_k > f.n_experts:
        return f"ffn.top_k: {f.top_k} exceeds ffn.n_experts {f.n_experts}"
    if problem := f.check_split():
        return problem
    lay = layout(f)
    if lay.n_routed % f.n_group:
        return f"ffn.n_group: {f.n_group} does not divide the {lay.n_routed} routed experts"
    if f.topk_group > f.n_group:
        return f"ffn.topk_group: {f.topk_group} exceeds ffn.n_group {f.n_group}"
    if lay.top_k > f.topk_group * (lay.n_routed // f.n_group):
        return f"ffn.topk_group: {f.topk_group} groups hold fewer than the {lay.top_k} experts each token needs"
    if f.aux_device_alpha and lay.n_routed % f.n_devices:
        return f"ffn.n_devices: {f.n_devices} does not divide the {lay.n_routed} routed experts"
    if f.first_k_dense > cfg.n_layers:
        return f"ffn.first_k_dense: {f.first_k_dense} exceeds model.n_layers {cfg.n_layers}"
    return None



# --- the layer ---


class MoEFeedForward(FeedForward):
    """Router → dispatch to grouped experts → combine, plus shared experts for deepseekmoe."""

    Config = RoutedFFNConfig
    routed = True
    balances = ("none", "aux", "bias")

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        f = cfg.ffn
        self.lay = lay = layout(f)
        self.balance, self.ffn_cfg = f.balance, f
        self.router = Router(cfg, lay)
        self.experts = GroupedExperts(lay.n_routed, cfg.d_model, lay.expert_d_ff, precision_of(cfg).fp8_recipe,
                                      f.swiglu_limit or None)
        for p in (self.router.weight, *self.experts.parameters()):
            nn.init.normal_(p, mean=0.0, std=cfg.init_std)
        shared_cfg = dataclasses.replace(cfg, ffn=DenseFFNConfig(d_ff=lay.shared_d_ff))
        self.shared = DenseFFN(shared_cfg) if lay.shared_d_ff else None
        if self.shared is not None:
            self.shared.part_name = "shared_experts"
        self.stats = RoutingStats(lay.n_routed)
        self.aux_loss: torch.Tensor | None = None
        self.token_domains: tuple[torch.Tensor, tuple[str, ...]] | None = None  # set by the decoder
        self.shard: expert_parallel.ExpertShard | None = None  # set by shard_experts: experts on several ranks

    @classmethod
    def build(cls, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        """Leading layers keep the dense FFN (DeepSeekMoE 16B: the first; V3: the first three)."""
        return DenseFFN(cfg, layer_idx) if layer_idx < cfg.ffn.first_k_dense else cls(cfg, layer_idx)

    check_config = staticmethod(check_config)

    @staticmethod
    def layout(cfg: ModelConfig) -> Layout:
        return layout(cfg.ffn)

    @staticmethod
    def check_parallel(cfg: ModelConfig, ep: int, redundant: int) -> str | None:
        """ep ranks must split the routed experts (and the EPLB replicas) evenly; the device-level
        loss must group the experts by the ranks that hold them."""
        f, n_routed = cfg.ffn, layout(cfg.ffn).n_routed
        if n_routed % ep:
            return (f"parallel.ep: {ep} does not divide the {n_routed} routed experts of ffn = {f.kind}; "
                    f"use an ep that divides it (or change ffn.n_experts / granularity / n_shared)")
        if redundant and (n_routed + redundant) % ep:
            return (f"parallel.redundant_experts: {redundant} + the {n_routed} routed experts of ffn = "
                    f"{f.kind} do not split over parallel.ep = {ep} ranks; use a multiple of {ep}")
        if f.aux_device_alpha and f.n_devices != ep:
            return (f"ffn.n_devices: {f.n_devices} with parallel.ep = {ep}: the device-level balance loss "
                    f"(aux_device_alpha) must group the experts by the ranks that hold them; set ffn.n_devices = {ep}")
        return None

    @classmethod
    def rank_param_count(cls, cfg: ModelConfig, layer_idx: int, ep: int, redundant: int) -> int:
        """A rank keeps ⌈(E + redundant)/ep⌉ of a routed layer's experts (redundant copies: V3
        §3.4.1); the gate and shared experts are replicated."""
        total = cls.param_count(cfg, layer_idx)
        if layer_idx < cfg.ffn.first_k_dense:
            return total
        lay = layout(cfg.ffn)
        local = -(-(lay.n_routed + redundant) // ep)
        return total - 3 * cfg.d_model * lay.expert_d_ff * (lay.n_routed - local)

    @staticmethod
    def train_activations(cfg: ModelConfig, seq_len: int) -> Activations:
        """The activated experts' SwiGLU (K·F + shared), each routed row's gathered input and
        weighted output (model width), and the FP32 router logits and scores. Leading dense
        layers are counted as routed ones (an upper bound)."""
        lay, C = layout(cfg.ffn), cfg.d_model
        swiglu = swiglu_train_activations(C, lay.top_k * lay.expert_d_ff + lay.shared_d_ff)
        return swiglu + Activations(wide=lay.top_k * 2 * C, fp32=2 * lay.n_routed)

    @staticmethod
    def inference_activations(cfg: ModelConfig, seq_len: int) -> int:
        lay = layout(cfg.ffn)
        return swiglu_inference_activations(lay.top_k * lay.expert_d_ff + lay.shared_d_ff)

    # --- accounting ---
    @staticmethod
    def _params(cfg: ModelConfig, layer_idx: int, active: bool) -> int:
        """Gate (every token scores every routed expert) + routed experts (all, or the K a token
        uses) + shared experts; a leading dense layer counts as the dense FFN."""
        if layer_idx < cfg.ffn.first_k_dense:
            return DenseFFN.param_count(cfg)
        lay, C = layout(cfg.ffn), cfg.d_model
        routed = lay.top_k if active else lay.n_routed
        return lay.n_routed * C + 3 * C * (routed * lay.expert_d_ff + lay.shared_d_ff)

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int = 0) -> int:
        return MoEFeedForward._params(cfg, layer_idx, active=False)

    @staticmethod
    def active_param_count(cfg: ModelConfig, layer_idx: int = 0) -> int:
        return MoEFeedForward._params(cfg, layer_idx, active=True)

    @staticmethod
    def flops_per_token(cfg: ModelConfig, layer_idx: int = 0) -> float:
        """Forward: 2 per multiply-add over the activated matmul parameters (softmax, top-k,
        permutation and the gate-weighted sum are ignored)."""
        return 2 * MoEFeedForward.active_param_count(cfg, layer_idx)

    @staticmethod
    def part_costs(cfg: ModelConfig, layer_idx: int, shape: PassShape) -> dict[str, PartCost]:
        """Router in FP32 (x, logits, scores); dispatch gathers rows in and out, weights and adds
        them back; an expert that receives a token reads its weights."""
        if layer_idx < cfg.ffn.first_k_dense:
            return DenseFFN.part_costs(cfg, layer_idx, shape)
        C, N, act, lay = cfg.d_model, shape.tokens, shape.act_bytes, layout(cfg.ffn)
        E, K, F_ = lay.n_routed, lay.top_k, lay.expert_d_ff
        costs: dict[str, PartCost] = {}
        add_cost(costs, "router", N * 2 * E * C, E * C * 4 + N * (C + 2 * E) * 4)
        add_cost(costs, "dispatch", 0.0, 4 * N * K * C * act)
        touched = min(E, N * K)
        add_cost(costs, "experts", N * 2 * K * 3 * C * F_, touched * 3 * C * F_ * shape.weight_bytes + N * K * 3 * (C + F_) * act)
        if lay.shared_d_ff:
            swiglu_costs(costs, "shared_experts", C, lay.shared_d_ff, shape)
        add_cost(costs, "balance", 0.0, N * E * 4)
        add_cost(costs, "routing_stats", 0.0, N * (E + K) * 4)
        return costs

    @staticmethod
    def kernel_families(cfg: ModelConfig, decodes: bool) -> tuple[str, ...]:
        return ("moe_experts",)  # FP8 experts add fp8_gemm through the precision

    @staticmethod
    def row_columns(cfg: ModelConfig) -> dict:
        """The resolved layout and router."""
        f, lay = cfg.ffn, layout(cfg.ffn)
        return {"n_experts": f.n_experts, "top_k": f.top_k, **f.split_columns(), "n_routed_experts": lay.n_routed,
                "routed_top_k": lay.top_k, "expert_d_ff": lay.expert_d_ff, "first_k_dense": f.first_k_dense,
                "router": f.router, "capacity_factor": f.capacity_factor, "uniform_routing": f.uniform_routing}

    @staticmethod
    def metric_columns() -> tuple[Metric, ...]:
        layout_columns = (variant_column(n, "ffn", u, d, f) for n, u, d, f in (
            ("n_experts", "1", "routed FFN: experts before fine-grained splitting", "int"),
            ("top_k", "1", "routed FFN: experts per token before splitting", "int"),
            ("granularity", "1", "DeepSeekMoE: each expert split into this many", "int"),
            ("n_shared", "1", "DeepSeekMoE: shared (always-on) experts; 0 for classic MoE", "int"),
            ("n_routed_experts", "1", "routed experts per layer after splitting", "int"),
            ("routed_top_k", "1", "routed experts per token after splitting", "int"),
            ("expert_d_ff", "1", "one expert's hidden width", "int"),
            ("first_k_dense", "1", "leading layers kept dense", "int"),
            ("router", "", "router scoring: softmax | sigmoid | v3 | sqrtsoftplus", "text"),
            ("capacity_factor", "1", "expert capacity (tokens dropped above it; none: no limit)", "g"),
            ("uniform_routing", "", "forced uniform routing (the dispatch-cost best case)", "bool")))
        dispatch = Metric("moe_dispatch", "speed", "", "routed FFN: the experts' implementation (op family moe_experts, "
                          "kernels/grouped_mm.py, through the cell's chooser): grouped_mm | padded_bmm | expert_loop | "
                          "reference | fp8_grouped_mm, or mixed when layers or shapes took different ones", fmt="text",
                          host_dependent=True)
        return (*layout_columns, dispatch)

    def set_token_domains(self, domains_B: torch.Tensor, names: tuple[str, ...]) -> None:
        self.token_domains = (domains_B, tuple(names))
        self.stats.prepare(self.router.weight.device, tuple(names))  # eager, before the forward

    def begin_step(self, step: int) -> None:
        """A slot for this step's routing record, which a compiled forward fills in place."""
        self.stats.open_step(self.router.weight.device, self.has_aux_loss())

    def has_aux_loss(self) -> bool:
        """Whether a training forward leaves a balance loss (balance_loss returns one)."""
        f = self.ffn_cfg
        return bool(self.balance == "aux" and (f.aux_alpha or f.aux_device_alpha)
                    or self.balance in ("aux", "bias") and f.seq_aux_alpha)

    # --- forward ---
    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        x_NC = x_BTC.reshape(B * T, C)
        with part("router", self):
            routing = self.router(x_NC)
            if self.ffn_cfg.uniform_routing:
                routing.expert_ids_NK = uniform_assignment(B * T, self.lay.n_routed, self.lay.top_k, x_NC.device)
                routing.weights_NK = self.router.gate_weights(routing.scores_NE, routing.expert_ids_NK)
        with part("dispatch", self):
            plan = plan_dispatch(routing.expert_ids_NK, routing.weights_NK, self.lay.n_routed, self.capacity(B * T))
        weighted_MC = self.run_experts(x_NC, plan, routing)
        shared_NC = self.shared(x_NC) if self.shared is not None else None
        with part("dispatch", self):
            out_NC = sum_rows(weighted_MC, plan, B * T)
            if shared_NC is not None:
                out_NC = out_NC + shared_NC
        with part("balance", self):
            self.aux_loss = self.balance_loss(routing, B, T) if self.training else None
        with part("routing_stats", self):
            self._observe(routing, plan, B, T)
        return out_NC.view(B, T, C)

    def run_experts(self, x_NC: torch.Tensor, plan: Dispatch, routing: Routing) -> torch.Tensor:
        """Each assignment row's gate-weighted expert output, in plan order: here, or on the
        ranks holding the experts (which send back unweighted rows, weighted here)."""
        if self.shard is not None:
            out_MC = expert_parallel.run_experts(x_NC, plan.token_M, plan.ends_E, self.experts, self.shard,
                                                 routing.expert_ids_NK, self.training, self)
            with part("dispatch", self):
                return out_MC * plan.weight_M[:, None].to(out_MC.dtype)
        with part("dispatch", self):
            x_MC = gather_rows(x_NC, plan)
        with part("experts", self):
            return self.experts(x_MC, plan.ends_E, plan.weight_M)

    def shard_experts(self, shard: expert_parallel.ExpertShard) -> None:
        """Keep only this rank's block of routed experts; the rest of the layer stays replicated."""
        expert_parallel.keep_local_experts(self.experts, shard)
        self.shard = shard

    def capacity(self, n_tokens: int) -> int | None:
        """GShard's expert capacity: capacity_factor × the balanced share N·K/E (None: dropless)."""
        if not self.ffn_cfg.capacity_factor:
            return None
        return math.ceil(self.ffn_cfg.capacity_factor * n_tokens * self.lay.top_k / self.lay.n_routed)

    def balance_loss(self, routing: Routing, B: int, T: int) -> torch.Tensor | None:
        f = self.ffn_cfg
        share_NE = per_token_share(routing.scores_NE, self.router.score_func)
        terms = []
        if self.balance == "aux" and f.aux_alpha:
            terms.append(expert_balance_loss(share_NE, routing.expert_ids_NK, f.aux_alpha))
        if self.balance == "aux" and f.aux_device_alpha:
            terms.append(device_balance_loss(share_NE, routing.expert_ids_NK, f.n_devices, f.aux_device_alpha))
        if self.balance in ("aux", "bias") and f.seq_aux_alpha:
            ids_BTK = routing.expert_ids_NK.view(B, T, -1)
            terms.append(sequence_balance_loss(share_NE.view(B, T, -1), ids_BTK, f.seq_aux_alpha))
        return torch.stack(terms).sum() if terms else None

    def _observe(self, routing: Routing, plan: Dispatch, B: int, T: int) -> None:
        domains_N, names = None, ()
        if self.token_domains is not None:
            domains_B, names = self.token_domains
            domains_N = domains_B.to(routing.expert_ids_NK.device).repeat_interleave(T)
        dropped = plan.dropped / routing.expert_ids_NK.numel()  # a tensor: read at the end of the cell
        self.stats.observe(routing.expert_ids_NK, routing.scores_NE, self.router.score_func, self.training,
                           self.aux_loss, dropped, domains_N, names, load_E=plan.load_E)

    def after_optimizer_step(self) -> None:
        load_E = self.stats.take_pending_load()
        if self.balance == "bias" and load_E is not None:
            if self.shard is not None:  # every rank's tokens, so the replicated bias stays identical
                load_E = expert_parallel.all_reduce_sum(load_E, self.shard)
            with part("balance", self):
                update_bias(self.router.expert_bias_E, load_E, self.ffn_cfg.bias_update_rate, self.ffn_cfg.bias_zero_mean)

    def metrics(self, layer: int) -> tuple[list[dict], dict]:
        if self.shard is not None:  # a collective: every rank reads its metrics at the end of the cell
            self.stats.sum_loads(lambda load: expert_parallel.all_reduce_sum(load, self.shard))
        bias = self.router.expert_bias_E if self.balance == "bias" else None
        records, summary = self.stats.layer_metrics(layer, bias)
        if (label := self.experts.dispatch_label()) is not None:
            summary["columns"] = {"moe_dispatch": label}
        return records, summary

