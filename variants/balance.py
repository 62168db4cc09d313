"""Load balancing for routed FFNs: the auxiliary losses, the auxiliary-loss-free bias update,
and the balance metrics (MaxVio, load, entropy, routing by data domain).

Legend: N tokens, B sequences, T tokens per sequence, E routed experts, K routed per token,
D data domains, S training steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def expert_load(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert, on the device: a scatter_add, where bincount's output
    length depends on the data (torch.compile breaks the graph on it)."""
    flat = expert_ids.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _selected_fraction(expert_ids_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """f_i = E/(K·N) · #tokens choosing expert i: 1 for every expert under perfect balance."""
    N, K = expert_ids_NK.shape
    return expert_load(expert_ids_NK, n_experts).float() * n_experts / (K * N)


def per_token_share(scores_NE: torch.Tensor, score_func: str) -> torch.Tensor:
    """s_{i,t} as the balance losses use it: softmax scores as they are, sigmoid ones
    normalised to sum 1 over experts (V3 §2.1.2, eq. 19)."""
    if score_func == "softmax":
        return scores_NE
    return scores_NE / (scores_NE.sum(dim=-1, keepdim=True) + 1e-20)


def expert_balance_loss(share_NE: torch.Tensor, expert_ids_NK: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeekMoE §3.3, eqs. 12–14: α1 · Σ_i f_i · P_i with P_i = mean_t s_{i,t}."""
    f_E = _selected_fraction(expert_ids_NK, share_NE.shape[1])
    return alpha * (f_E * share_NE.mean(dim=0)).sum()


def device_balance_loss(share_NE: torch.Tensor, expert_ids_NK: torch.Tensor, n_devices: int, alpha: float) -> torch.Tensor:
    """DeepSeekMoE §3.3, eqs. 15–17: experts in D contiguous groups; α2 · Σ_d f'_d · P'_d with
    f'_d the mean of f_i over group d and P'_d the sum of P_i over it."""
    E = share_NE.shape[1]
    f_DG = _selected_fraction(expert_ids_NK, E).view(n_devices, E // n_devices)
    p_DG = share_NE.mean(dim=0).view(n_devices, E // n_devices)
    return alpha * (f_DG.mean(dim=1) * p_DG.sum(dim=1)).sum()


def sequence_balance_loss(share_BTE: torch.Tensor, expert_ids_BTK: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3 §2.1.2, eqs. 17–20: the expert-level loss within each sequence, averaged
    over the batch's sequences (the complementary sequence-wise balance loss)."""
    B, T, E = share_BTE.shape
    K = expert_ids_BTK.shape[-1]
    counts_BE = torch.zeros(B, E, device=share_BTE.device).scatter_add_(
        1, expert_ids_BTK.reshape(B, T * K), torch.ones(B, T * K, device=share_BTE.device)
    )
    f_BE = counts_BE * E / (K * T)
    return alpha * (f_BE * share_BTE.mean(dim=1)).sum(dim=1).mean()


@torch.no_grad()
def update_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float, zero_mean: bool) -> None:
    """Auxiliary-loss-free balancing (V3 §2.1.2; Wang et al. 2408.15664, Algorithm 1), in place:
    b_i ← b_i + γ · sign(mean_j load_j − load_i): overloaded experts lose bias, underloaded gain.
    zero_mean re-centres b afterwards (an option; V3 does not)."""
    bias_E += rate * torch.sign(load_E.float().mean() - load_E.float())
    if zero_mean:
        bias_E -= bias_E.mean()


def _accumulate(total: torch.Tensor | None, add: torch.Tensor) -> torch.Tensor:
    """total + add; in place where total exists (a compiled forward: no new Python state)."""
    if total is None:
        return add if torch.compiler.is_compiling() else add.clone()
    return total.add_(add) if torch.compiler.is_compiling() else total + add


def maxvio(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i − mean load) / mean load (Wang et al. 2408.15664, eq. 4)."""
    load_E = load_E.float()
    mean = load_E.mean()
    return (load_E.max() - mean) / mean


def router_entropy(scores_NE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of each token's expert distribution."""
    p_NE = per_token_share(scores_NE.detach(), score_func)
    return -(p_NE * p_NE.clamp_min(1e-20).log()).sum(dim=-1).mean()


@dataclass
class StepRecord:
    """What one training forward saw. `written`: None for a record an eager forward appended; for
    a slot opened before a compiled forward (open_step), a 0-d tensor the forward sets to 1."""

    load_E: torch.Tensor
    entropy: torch.Tensor
    aux: torch.Tensor | None
    dropped: torch.Tensor | float
    written: torch.Tensor | None = None


class RoutingStats:
    """What one routed layer saw: kept on the device and read once, at the end of the cell.

    Nothing in `observe` reads a value on the host, and under torch.compile nothing in it grows
    a Python container either (a list's length is a guard: one recompilation per step): there
    the forward writes, in place, into tensors allocated before it by `prepare` (every workload's
    set_token_domains) and `open_step` (each training step's begin_step), which run eager."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.records: list[StepRecord] = []  # one per training forward (= step)
        self.open: StepRecord | None = None  # the slot a compiled training forward writes
        self.pending_load_E: torch.Tensor | None = None  # since the last bias update
        self.eval_load_E: torch.Tensor | None = None  # held-out / inference forwards
        self.eval_forwards = 0  # eager forwards counted here; compiled ones leave eval_load_E > 0
        self.domain_load_DE: torch.Tensor | None = None
        self.domain_names: tuple[str, ...] = ()

    # --- eager, before a forward ---
    def prepare(self, device, domain_names: tuple[str, ...]) -> None:
        """Allocate the accumulators a compiled forward adds to in place."""
        if self.pending_load_E is None:
            self.pending_load_E = torch.zeros(self.n_experts, dtype=torch.int64, device=device)
        if self.eval_load_E is None:
            self.eval_load_E = torch.zeros(self.n_experts, dtype=torch.int64, device=device)
        if self.domain_load_DE is None:
            self.domain_names = tuple(domain_names)
            self.domain_load_DE = torch.zeros(len(domain_names), self.n_experts, device=device)

    def open_step(self, device, has_aux: bool) -> None:
        """A slot for the next training forward, if it runs compiled (an eager one appends its own)."""
        zero = torch.zeros((), device=device)
        self.open = StepRecord(torch.zeros(self.n_experts, dtype=torch.int64, device=device), zero.clone(),
                               zero.clone() if has_aux else None, zero.clone(), torch.zeros((), dtype=torch.int64, device=device))
        self.records.append(self.open)

    # --- in the forward ---
    def observe(self, expert_ids_NK, scores_NE, score_func, training, aux_loss, dropped_fraction, domains_N, domain_names,
                load_E=None):
        """load_E: the assignments per expert where the caller counted them already (else counted here)."""
        load_E = expert_load(expert_ids_NK, self.n_experts) if load_E is None else load_E
        if training:
            entropy = router_entropy(scores_NE, score_func)
            aux = None if aux_loss is None else aux_loss.detach()
            if torch.compiler.is_compiling():
                self._write_open(load_E, entropy, aux, dropped_fraction)
            else:
                self.records.append(StepRecord(load_E, entropy, aux, dropped_fraction))
            self.pending_load_E = _accumulate(self.pending_load_E, load_E)
        else:
            self.eval_load_E = _accumulate(self.eval_load_E, load_E)
            self.eval_forwards += not torch.compiler.is_compiling()
        if domains_N is not None:
            self._observe_domains(expert_ids_NK, domains_N, domain_names)

    def _write_open(self, load_E, entropy, aux, dropped) -> None:
        slot = self.open
        if slot is None:  # a compiled forward outside a training step (no open_step): not a step
            return
        slot.load_E.copy_(load_E), slot.entropy.copy_(entropy), slot.written.fill_(1)
        if slot.aux is not None and aux is not None:
            slot.aux.copy_(aux)
        if isinstance(slot.dropped, torch.Tensor):
            slot.dropped.copy_(dropped)

    def _observe_domains(self, expert_ids_NK, domains_N, domain_names):
        if self.domain_load_DE is None:
            self.domain_names = tuple(domain_names)
            self.domain_load_DE = torch.zeros(len(domain_names), self.n_experts, device=expert_ids_NK.device)
        K = expert_ids_NK.shape[1]
        rows = domains_N.repeat_interleave(K)
        self.domain_load_DE.index_put_((rows, expert_ids_NK.flatten()), torch.ones_like(rows, dtype=torch.float), accumulate=True)

    # --- eager, after ---
    def steps(self) -> list[StepRecord]:
        """The training forwards' records (a slot no forward wrote, left out; reads its flag)."""
        return [r for r in self.records if r.written is None or bool(r.written)]

    @property
    def train_load_SE(self) -> list[torch.Tensor]:
        return [r.load_E for r in self.steps()]

    def sum_loads(self, reduce) -> None:
        """Replace the loads by reduce(load): an expert-parallel layer's, summed over its ranks, so
        the balance metrics describe the global batch, not one rank's share."""
        steps = self.steps()
        if steps:
            for r, load in zip(steps, reduce(torch.stack([r.load_E for r in steps])).unbind(0)):
                r.load_E = load
        if self.eval_load_E is not None:
            self.eval_load_E = reduce(self.eval_load_E)
        if self.domain_load_DE is not None:
            self.domain_load_DE = reduce(self.domain_load_DE)

    def take_pending_load(self) -> torch.Tensor | None:
        load, self.pending_load_E = self.pending_load_E, None
        self.open = None
        return load

    def layer_metrics(self, layer: int, bias_E: torch.Tensor | None) -> tuple[list[dict], dict]:
        """(series records, per-layer summary) of everything observed."""
        records, summary = [], {}
        steps = self.steps()
        if steps:
            records, summary = self._train_metrics(layer, steps)
        if self.eval_load_E is not None and (self.eval_forwards or bool(self.eval_load_E.sum() > 0)):
            summary["maxvio_eval"] = float(maxvio(self.eval_load_E))
        if self.domain_load_DE is not None and bool(self.domain_load_DE.sum() > 0):
            records += self._domain_records(layer)
        if bias_E is not None:
            records += [dict(step=-1, metric="expert_bias", value=float(b), layer=layer, index=e) for e, b in enumerate(bias_E.cpu())]
        return records, summary

    def _train_metrics(self, layer: int, steps: list[StepRecord]) -> tuple[list[dict], dict]:
        load_SE = torch.stack([r.load_E for r in steps]).cpu()
        maxvio_S = torch.stack([maxvio(row) for row in load_SE])
        entropy_S = torch.stack([r.entropy for r in steps]).cpu()
        aux_S = [r.aux for r in steps if r.aux is not None]
        records = [dict(step=s, metric="maxvio_batch", value=float(v), layer=layer) for s, v in enumerate(maxvio_S)]
        records += [dict(step=s, metric="router_entropy", value=float(v), layer=layer) for s, v in enumerate(entropy_S)]
        records += [dict(step=s, metric="expert_load", value=int(c), layer=layer, index=e)
                    for s, row in enumerate(load_SE) for e, c in enumerate(row.tolist())]
        records += [dict(step=s, metric="aux_loss", value=float(v), layer=layer) for s, v in enumerate(aux_S)]
        dropped_S = [float(r.dropped) for r in steps]
        records += [dict(step=s, metric="dropped_fraction", value=v, layer=layer) for s, v in enumerate(dropped_S)]
        total_E = load_SE.sum(dim=0)
        summary = {
            "maxvio_batch": maxvio_S,
            "maxvio_train": float(maxvio(total_E)),
            "dead_expert_fraction": float((total_E == 0).float().mean()),
            "router_entropy": float(entropy_S.mean()),
            "dropped_fraction": sum(dropped_S) / len(dropped_S),
            "aux_loss_final": float(aux_S[-1]) if aux_S else None,
        }
        return records, summary

    def _domain_records(self, layer: int) -> list[dict]:
        counts_DE = self.domain_load_DE.cpu()
        share_DE = counts_DE / counts_DE.sum(dim=1, keepdim=True).clamp_min(1)
        return [dict(step=-1, metric="routing_by_domain", value=float(share_DE[d, e]), layer=layer, index=e, domain=name)
                for d, name in enumerate(self.domain_names) if counts_DE[d].sum() > 0 for e in range(self.n_experts)]


def routing_metrics(layer: int, train_load_SE: list[torch.Tensor], eval_load_E: torch.Tensor | None = None,
                    entropy_S: list[float] | None = None) -> tuple[list[dict], dict]:
    """What a routed layer that counts its own expert loads returns from `metrics(layer)` to get
    the built-in balance columns (maxvio_global, maxvio_batch_*, maxvio_train, dead_expert_fraction,
    router_entropy) and series (maxvio_batch, expert_load per expert and step): train_load_SE one
    (E,) int load per training step, eval_load_E the held-out forwards' summed load, entropy_S the
    mean routing entropy per step (0 where not given)."""
    stats = RoutingStats((train_load_SE[0] if train_load_SE else eval_load_E).numel())
    for s, load_E in enumerate(train_load_SE):
        entropy = torch.tensor(0.0 if entropy_S is None else float(entropy_S[s]))
        stats.records.append(StepRecord(load_E, entropy, None, 0.0))
    if eval_load_E is not None:
        stats.eval_load_E, stats.eval_forwards = eval_load_E, 1
    return stats.layer_metrics(layer, None)


def combine_layers(per_layer: list[dict]) -> tuple[list[dict], dict]:
    """Cell-level columns from the routed layers: means, and percentiles across layers.

    maxvio_global: MaxVio of the loads summed over the held-out (eval) or inference forwards
    when there were any — the paper computes it on validation data — else over training.
    """
    if not per_layer:
        return [], {}
    records, columns = [], {}
    if "maxvio_batch" in per_layer[0]:
        maxvio_LS = torch.stack([layer["maxvio_batch"] for layer in per_layer])
        mean_S = maxvio_LS.mean(dim=0)
        records = [dict(step=s, metric="maxvio_batch", value=float(v)) for s, v in enumerate(mean_S)]
        columns.update(maxvio_batch_mean=float(mean_S.mean()), maxvio_batch_final=float(mean_S[-1]))
        for key in ("maxvio_train", "dead_expert_fraction", "router_entropy", "dropped_fraction"):
            columns[key] = sum(layer[key] for layer in per_layer) / len(per_layer)
        aux = [layer["aux_loss_final"] for layer in per_layer if layer["aux_loss_final"] is not None]
        columns["aux_loss_final"] = sum(aux) if aux else None
    source = "maxvio_eval" if "maxvio_eval" in per_layer[0] else "maxvio_train"
    if source in per_layer[0]:
        global_L = torch.tensor([layer[source] for layer in per_layer])
        columns.update(
            maxvio_global=float(global_L.mean()),
            maxvio_global_p50=float(global_L.quantile(0.5)),
            maxvio_global_p90=float(global_L.quantile(0.9)),
            maxvio_global_max=float(global_L.max()),
            maxvio_global_source="eval" if source == "maxvio_eval" else "train",
        )
    return records, columns
