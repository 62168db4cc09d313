"""DeepSeek Sparse Attention (DeepSeek-V3.2-Exp, 2025): MLA whose main attention reads only the
index_topk earlier tokens a small "lightning indexer" ranks highest.

The indexer (its scores I(t,s), RoPE layout, FP8 path, top-k selection and KL) is
variants/lightning_indexer.py.

The main attention is MLA's MQA form over the latent cache (V3.2: "we implement DSA based on the
MQA mode of MLA"): each query attends to the latent rows [c^KV | k^R] of its selected tokens,
gathered (never a dense score matrix over the whole context), with W^UK folded into the query and
W^UV into the output. Where index_topk covers every causal key, the selection is everything and
the module runs MLA's own dense path, so DSA then equals MLA exactly.

Training (V3.2 §2.1, "continued pre-training"): `index_stage`
- "dense" warm-up: the main attention stays dense; only the indexer trains (the rest is frozen),
  by L^I = Σ_t KL(p_t ‖ softmax(I_t)), p_t the main attention's distribution summed over heads
  and L1-normalised;
- "sparse": the main model trains through the sparse attention on the LM loss; the indexer on the
  KL over the selected set, from a detached input (V3.2: "we detach the indexer input from the
  computational graph for separate optimization").
- "staged": both in one training, after plain MLA training of the main model (V3.2 starts from
  the dense V3.1 checkpoint): index_dense_steps as MLA, index_warmup_steps of warm-up, then sparse.
The KL (mean per query, mean over layers) is the named loss "indexer_kl".

Legend as mla.py; I index_n_heads, Di index_head_dim, K = min(index_topk, keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from dsbench.kernels import choice
from dsbench.metrics import Metric, variant_column
from .base import Activations, PartCost, PassShape, at_least, choices
from .lightning_indexer import FP8_DTYPE, GROUP, LightningIndexer, fp8_indexer, indexer_dims, kl_to_indexer, select
from .mla import LatentCache, MLAConfig, MultiHeadLatentAttention, mla_dims
from .profiling import part

if TYPE_CHECKING:
    from .config import ModelConfig

INDEX_STAGES = ("sparse", "dense", "staged")
PREFILL_FORMS = ("gather", "masked")
QUERY_CHUNK = 256  # queries whose gathered latent rows are held at once (prefill memory: chunk·K·(Dc+Dr))


@dataclass(frozen=True)
class DSAConfig(MLAConfig):
    """MLA's dims plus the indexer's (V3.2-Exp's config.json: index_topk 2048, index_n_heads 64,
    index_head_dim 128)."""

    kind: str = "dsa"
    index_topk: int = at_least(2048, 1)
    index_n_heads: int = at_least(4, 1)
    index_head_dim: int = at_least(32, 2)  # its first qk_rope_head_dim channels carry RoPE
    index_stage: str = choices("sparse", *INDEX_STAGES)
    # "staged": V3.2's continued pre-training in one run. The first index_dense_steps train the
    # model as MLA (the dense checkpoint V3.2 starts from; the indexer is not run), the next
    # index_warmup_steps are the dense warm-up, the rest sparse training.
    index_dense_steps: int = at_least(0, 0)
    index_warmup_steps: int = at_least(0, 0)
    # How a whole sequence (train, prefill) reads its selection: "gather" the selected latent rows
    # (O(L·k): the form sparse kernels take), or "masked" dense latent scores with every unselected
    # key masked (O(L²), DeepSeek-V3.2-Exp's reference inference code for prefill). The same
    # numbers either way; decode always gathers.
    dsa_prefill: str = choices("gather", *PREFILL_FORMS)

    LATE_DEFAULTS: ClassVar[dict] = {**MLAConfig.LATE_DEFAULTS, "index_dense_steps": 0, "index_warmup_steps": 0}


class IndexedLatentCache(LatentCache):
    """MLA's latent cache plus the indexer's key cache (E4M3 and its scales under fp8)."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device, index_dim: int, fp8: bool):
        super().__init__(batch, max_len, kv_lora_rank, rope_dim, dtype, device)
        self.fp8 = fp8
        self.register_buffer("index_k", torch.zeros(batch, max_len, index_dim, dtype=FP8_DTYPE if fp8 else dtype, device=device),
                             persistent=False)
        groups = -(-index_dim // GROUP)
        self.register_buffer("index_k_scale", torch.zeros(batch, max_len, groups if fp8 else 0, device=device), persistent=False)

    def update_index(self, start_pos: int, keys):
        """Write the new tokens' indexer keys; return every key so far (and scales under fp8)."""
        k, scale = keys if self.fp8 else (keys, None)
        end = start_pos + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end} needs a longer cache")
        self.index_k[:, start_pos:end] = k
        if scale is not None:
            self.index_k_scale[:, start_pos:end] = scale
            return self.index_k[:, :end], self.index_k_scale[:, :end]
        return self.index_k[:, :end]

    def live_bytes_per_token(self) -> int:
        per_row = self.index_k.element_size() * self.index_k[:, 0].numel() + self.index_k_scale.element_size() * self.index_k_scale[:, 0].numel()
        return super().live_bytes_per_token() + per_row // self.index_k.shape[0]



class DeepSeekSparseAttention(MultiHeadLatentAttention):
    Config = DSAConfig

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.indexer = LightningIndexer(cfg)
        self.K, self.schedule = cfg.attention.index_topk, cfg.attention
        self.stage = "sparse" if cfg.attention.index_stage == "staged" else cfg.attention.index_stage  # inference: the last stage
        self.masked = cfg.attention.dsa_prefill == "masked"
        self.observing = False
        self.kept_mass: list[float] = []  # per observed forward: the main attention's mass on the selection
        self.kl_loss: torch.Tensor | None = None  # the last training forward's indexer KL

    # --- accounting ---
    @staticmethod
    def _indexer_params(cfg: ModelConfig) -> int:
        i, C = indexer_dims(cfg), cfg.d_model
        return i.q_in * i.n * i.D + C * i.D + 2 * i.D + C * i.n  # wq_b, wk, k_norm (weight, bias), weights_proj

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        return MultiHeadLatentAttention.param_count(cfg) + DeepSeekSparseAttention._indexer_params(cfg)

    @staticmethod
    def indexer_flops_per_token(cfg: ModelConfig, context_len: float) -> float:
        """Projections (wq_b, wk, weights_proj) and, per scored key, I·Di for q·k and I for the
        weighted sum over heads: 2 FLOPs per multiply-add."""
        i = indexer_dims(cfg)
        proj = i.q_in * i.n * i.D + cfg.d_model * i.D + cfg.d_model * i.n
        return 2 * proj + 2 * (i.n * i.D + i.n) * context_len

    @staticmethod
    def selected_keys(cfg: ModelConfig, context_len: float, decode: bool) -> float:
        """Mean keys the main attention reads per token. Decode: min(K, context). A whole sequence
        of T = 2·context − 1 tokens (mean causal context (T+1)/2): (1/T)·Σ_t min(K, t + 1)."""
        K = cfg.attention.index_topk
        if decode:
            return min(K, context_len)
        T = round(2 * context_len - 1)
        if T <= K:
            return context_len
        return (K * (K + 1) / 2 + (T - K) * K) / T

    @staticmethod
    def flops_per_token(cfg: ModelConfig, context_len: float, decode: bool = False) -> float:
        """Indexer over every causal key plus the main attention over the selected ones. Where K
        covers every key the main attention is MLA's dense path (its own count); otherwise the
        MQA latent form: per selected key and head, scores Dc + Dr and AV Dc. The causal count:
        a whole sequence runs it exactly with one query per chunk; with QUERY_CHUNK queries each
        chunk also scores the keys between a query and the chunk's last one (QUERY_CHUNK/2 a query
        on average: 1.6% more indexer keys at 16K)."""
        indexer = DeepSeekSparseAttention.indexer_flops_per_token(cfg, context_len)
        keys = DeepSeekSparseAttention.selected_keys(cfg, context_len, decode)
        if keys >= context_len:  # dense: everything is selected
            return indexer + MultiHeadLatentAttention.flops_per_token(cfg, context_len, decode)
        d = mla_dims(cfg)
        if not decode and cfg.attention.dsa_prefill == "masked":  # every causal key scored, then masked
            keys = context_len
        # The absorbed W^UK / W^UV cost what up-projecting the latent would (mla.py): the same projections.
        return indexer + 2 * MultiHeadLatentAttention._matmul_params(cfg) + 2 * d.H * (2 * d.Dc + d.Dr) * keys

    @staticmethod
    def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
        """The latent (Dc + Dr values) plus the indexer's key: Di values, or Di E4M3 bytes and a
        4-byte scale per 128 channels under fp8."""
        d, i = mla_dims(cfg), indexer_dims(cfg)
        index = i.D + 4 * -(-i.D // GROUP) if fp8_indexer(cfg) else i.D * dtype_bytes
        return (d.Dc + d.Dr) * dtype_bytes + index

    @staticmethod
    def part_costs(cfg: ModelConfig, shape: PassShape) -> dict[str, PartCost]:
        """MLA's parts, with the indexer's and the sparse main attention's traffic as they run:
        - indexer: the projections' weights; the cached keys read once per query chunk (once a
          step decoding), in E4M3 and their scales under fp8; each score written and read once by
          the top-k (fp32, 8 bytes a query and key; the blocked scores keep the per-head logits in
          cache, the reference's (T·n, S) logits are not counted).
        - attn.core, where fewer than every key is selected: each query's selected latent rows read
          from the cache, written by the gather and read back by the two matmuls (3 row reads or
          writes a selected key), q and o in the latent form, the new rows written; the masked
          whole-sequence form reads every key of its chunk once per query chunk instead."""
        costs = MultiHeadLatentAttention.part_costs(cfg, shape)
        ctx, N, act = shape.mean_context_len, shape.tokens, shape.act_bytes
        dense = MultiHeadLatentAttention.flops_per_token(cfg, ctx, shape.decode)
        total = DeepSeekSparseAttention.flops_per_token(cfg, ctx, shape.decode)
        indexer = DeepSeekSparseAttention.indexer_flops_per_token(cfg, ctx)
        costs["attn.core"].flops += N * (total - indexer - dense)  # the main attention's sparse saving (≤ 0)
        i, d = indexer_dims(cfg), mla_dims(cfg)
        chunks = shape.batch if shape.decode else N / min(QUERY_CHUNK, max(1.0, N / shape.batch))  # key passes a step
        chunk_keys = ctx if shape.decode else ctx + min(QUERY_CHUNK, N / shape.batch) / 2  # keys a chunk's last query sees
        key_bytes = i.D + 4 * -(-i.D // GROUP) if fp8_indexer(cfg) else i.D * act
        index_bytes = chunks * chunk_keys * key_bytes + N * ctx * 8
        costs["indexer"] = PartCost(N * indexer, index_bytes + DeepSeekSparseAttention._indexer_params(cfg) * shape.weight_bytes)
        selected = DeepSeekSparseAttention.selected_keys(cfg, ctx, shape.decode)
        if selected < ctx:  # the sparse path (else MLA's own dense path runs, and its traffic stands)
            row = (d.Dc + d.Dr) * act
            qo = d.H * (2 * d.Dc + d.Dr) * act
            if not shape.decode and cfg.attention.dsa_prefill == "masked":
                reads = chunks * chunk_keys * row
            else:
                reads = N * 3 * selected * row
            costs["attn.core"].bytes = reads + N * (qo + row)
        return costs

    @staticmethod
    def _selected_scores(cfg: ModelConfig, seq_len: int) -> int:
        """V3.2 §2.1: main heads' and indexer heads' scores and probabilities over the selected keys."""
        a = cfg.attention
        return 2 * (a.n_heads + a.index_n_heads) * min(a.index_topk, seq_len)

    @staticmethod
    def train_activations(cfg: ModelConfig, seq_len: int) -> Activations:
        """MLA's, and the FP32 scores over min(index_topk, T) keys."""
        scores = Activations(fp32=DeepSeekSparseAttention._selected_scores(cfg, seq_len))
        return MultiHeadLatentAttention.train_activations(cfg, seq_len) + scores

    @staticmethod
    def inference_activations(cfg: ModelConfig, seq_len: int) -> int:
        return MultiHeadLatentAttention.inference_activations(cfg, seq_len) + DeepSeekSparseAttention._selected_scores(cfg, seq_len)

    @staticmethod
    def metric_columns() -> tuple[Metric, ...]:
        own = (variant_column(n, "attention", u, d, f) for n, u, d, f in (
            ("index_topk", "1", "DSA: keys each query's main attention reads (V3.2: 2048)", "int"),
            ("index_n_heads", "1", "DSA: lightning-indexer heads (V3.2: 64)", "int"),
            ("index_head_dim", "1", "DSA: indexer query/key width, its first qk_rope_head_dim channels RoPE'd (V3.2: 128)", "int"),
            ("index_stage", "", "DSA training: dense (warm-up, the indexer alone) | sparse | staged (MLA steps, warm-up, then sparse)", "text"),
            ("index_dense_steps", "1", "DSA staged training: the first steps, trained as plain MLA (V3.2 starts from a dense checkpoint)", "int"),
            ("index_warmup_steps", "1", "DSA staged training: the dense warm-up's steps (the indexer alone, by KL), then sparse", "int"),
            ("dsa_prefill", "", "DSA whole sequences: gather the selected rows (O(L·k)) | masked dense scores (O(L²))", "text")))
        kept = Metric("indexer_kept_mass", "loss", "1", "DSA: the main attention's probability mass the indexer's top-k keeps "
                      "(held-out forwards, mean over queries and layers)", fmt="pct", better="higher")
        return (*MultiHeadLatentAttention.metric_columns(), *own, kept)

    @staticmethod
    def kernel_families(cfg: ModelConfig, decodes: bool) -> tuple[str, ...]:
        # the indexer and its selection (past index_topk keys), and MLA's own below them
        return (*MultiHeadLatentAttention.kernel_families(cfg, decodes), "dsa_index_scores", "dsa_topk", "dsa_attention")

    @staticmethod
    def row_columns(cfg: ModelConfig) -> dict:
        i = indexer_dims(cfg)
        return {**MultiHeadLatentAttention.row_columns(cfg), "index_topk": i.K, "index_n_heads": i.n, "index_head_dim": i.D,
                "index_stage": cfg.attention.index_stage, "dsa_prefill": cfg.attention.dsa_prefill,
                **({"index_dense_steps": cfg.attention.index_dense_steps, "index_warmup_steps": cfg.attention.index_warmup_steps}
                   if cfg.attention.index_stage == "staged" else {})}

    @staticmethod
    def check_config(cfg: ModelConfig) -> str | None:
        if problem := MultiHeadLatentAttention.check_config(cfg):
            return problem
        i = indexer_dims(cfg)
        if i.D <= i.Dr:
            return (f"attention.index_head_dim: {i.D} does not fit the indexer's RoPE channels (qk_rope_head_dim {i.Dr}); "
                    f"use index_head_dim > {i.Dr}")
        a = cfg.attention
        if a.index_stage != "staged" and (a.index_dense_steps or a.index_warmup_steps):
            field = "index_dense_steps" if a.index_dense_steps else "index_warmup_steps"
            return f"attention.{field}: {getattr(a, field)} is read only with index_stage = 'staged' (it is {a.index_stage!r})"
        if a.index_stage == "staged" and not a.index_warmup_steps:
            return "attention.index_warmup_steps: 0 with index_stage = 'staged'; the staged training needs a warm-up of at least 1 step"
        if fp8_indexer(cfg) and i.D & (i.D - 1):
            return f"attention.index_head_dim: {i.D} is not a power of two, which the FP8 indexer's Hadamard rotation needs (V3.2: 128)"
        return None

    def set_observing(self, on: bool) -> None:
        self.observing = on

    def metrics(self, layer: int):
        """The share of the main attention's probability mass (dense, summed over heads) that the
        indexer's selection keeps, mean over the observed (held-out) forwards' queries."""
        if not self.kept_mass:
            return None
        kept = sum(self.kept_mass) / len(self.kept_mass)
        return [dict(step=0, metric="indexer_kept_mass", value=kept, layer=layer)], {"columns": {"indexer_kept_mass": kept}}

    def new_cache(self, batch: int, max_len: int, dtype, device) -> IndexedLatentCache:
        d = self.dims
        return IndexedLatentCache(batch, max_len, d.Dc, d.Dr, dtype, device, self.indexer.dims.D, self.indexer.fp8)

    def begin_step(self, step: int) -> None:
        """A staged training's stage at this step: "base" (plain MLA, the indexer idle), "dense", "sparse"."""
        a = self.schedule
        if a.index_stage == "staged":
            self.stage = ("base" if step < a.index_dense_steps else
                          "dense" if step < a.index_dense_steps + a.index_warmup_steps else "sparse")

    @staticmethod
    def check_training(cfg: ModelConfig, steps: int) -> str | None:
        a = cfg.attention
        if a.index_stage == "staged" and a.index_dense_steps + a.index_warmup_steps >= steps:
            return (f"attention.index_warmup_steps: index_dense_steps {a.index_dense_steps} + index_warmup_steps "
                    f"{a.index_warmup_steps} leave no sparse step of train.steps {steps}; use a sum below {steps}")
        return None

    def only_trains(self) -> list[nn.Parameter] | None:
        """The dense warm-up trains the indexer alone."""
        return list(self.indexer.parameters()) if self.stage == "dense" else None

    def named_losses(self) -> dict[str, torch.Tensor]:
        return {"indexer_kl": self.kl_loss} if self.kl_loss is not None else {}

    # --- forward ---
    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: IndexedLatentCache | None = None) -> torch.Tensor:
        d = self.dims
        S = start_pos + x.shape[1]
        if self.stage == "base":  # a staged training's dense steps: plain MLA, the indexer idle
            self.kl_loss = None
            return super().forward(x, start_pos, cache)
        q_latent = self.q_norm(self.wq_a(x)) if d.Dq else x
        train_indexer = torch.is_grad_enabled() and self.training
        h_in, q_in = (x.detach(), q_latent.detach()) if train_indexer else (x, q_latent)  # V3.2: detached
        with part("indexer", self):
            keys, q_idx, w_idx = self.indexer.project(q_in, h_in, start_pos)
            k_all = self.indexer.key_values(cache.update_index(start_pos, keys) if cache is not None else keys)
        self.kl_loss = None
        if min(self.K, S) >= S or self.stage == "dense":  # every key selected, or the warm-up: MLA's own path
            out = super().forward(x, start_pos, cache)
            if train_indexer:
                self.kl_loss = self._dense_kl(x, q_latent, start_pos, q_idx, w_idx, k_all)
            return out
        out = self._sparse(x, q_latent, start_pos, cache, q_idx, w_idx, k_all, train_indexer)
        if self.observing and start_pos == 0:
            self.kept_mass.append(self._kept_mass(x, q_latent, q_idx, w_idx, k_all))
        return out

    @torch.no_grad()
    def _kept_mass(self, x, q_latent, q_idx, w_idx, k_all) -> float:
        """Σ over the selected keys of the dense attention (summed over heads, normalised), mean over queries."""
        p = dense_attention_mass(self, x, q_latent)  # (B, T, S)
        idx, valid = select(self.indexer.score(q_idx, w_idx, k_all), 0, self.K)
        return float((torch.gather(p, -1, idx) * valid).sum(dim=-1).mean())

    def _latent_queries(self, q_latent: torch.Tensor, start_pos: int) -> torch.Tensor:
        """[W^UK-absorbed q^C ; RoPE(q^R)] (B, H, T, Dc + Dr)."""
        d, B, T = self.dims, q_latent.shape[0], q_latent.shape[1]
        with part("attn.proj", self):
            q = (self.wq_b(q_latent) if d.Dq else self.wq(q_latent)).view(B, T, d.H, d.Dn + d.Dr).transpose(1, 2)
            q_nope, q_rope = q.split([d.Dn, d.Dr], dim=-1)
            w_uk, _ = self._up_weights()
            q_nope = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)
        with part("attn.rope", self):
            q_rope = self.rope(q_rope, start_pos)
        return torch.cat([q_nope, q_rope], dim=-1)

    def _latent_rows(self, x: torch.Tensor, start_pos: int, cache) -> torch.Tensor:
        """Every latent row [c^KV | RoPE(k^R)] so far (B, S, Dc + Dr), written to the cache if any."""
        d = self.dims
        with part("attn.proj", self):
            c_kv, k_rope = self.wkv_a(x).split([d.Dc, d.Dr], dim=-1)
        with part("attn.rope", self):
            k_rope = self.rope(k_rope.unsqueeze(1), start_pos).squeeze(1)
        latent = torch.cat([self.kv_norm(c_kv), k_rope], dim=-1)
        with part("attn.core", self):
            return cache.update(start_pos, latent) if cache is not None else latent

    def _sparse(self, x, q_latent, start_pos, cache, q_idx, w_idx, k_all, train_indexer: bool) -> torch.Tensor:
        """Per chunk of QUERY_CHUNK queries: the indexer's scores against the chunk's causal keys
        (every key up to its last query), the top-K selection, and the main attention over the
        gathered latent rows of the selection. Each of the three is an op family (kernels/)."""
        d, K = self.dims, self.K
        kv = self._latent_rows(x, start_pos, cache)  # (B, S, Dc + Dr)
        q = self._latent_queries(q_latent, start_pos)  # (B, H, T, Dc + Dr)
        outs, kl_terms = [], []
        rows = logits = None  # reused scratch at inference (autograd keeps each chunk's own)
        if not torch.is_grad_enabled():
            t_max = min(QUERY_CHUNK, q.shape[2])
            rows = kv.new_empty(kv.shape[0] * t_max * K, kv.shape[2])
            logits = k_all.new_empty(kv.shape[0] * t_max * self.indexer.dims.n * kv.shape[1])
        for t0 in range(0, q.shape[2], QUERY_CHUNK):
            sl = slice(t0, t0 + QUERY_CHUNK)
            keys = start_pos + min(t0 + QUERY_CHUNK, q.shape[2])  # the chunk's causal keys: later ones are masked for all of it
            k_sel = min(K, keys)
            with part("indexer", self):
                index_scores = choice.run("dsa_index_scores", q_idx[:, :, sl], w_idx[:, sl], k_all[:, :keys], buffer=logits)  # (B, t, keys)
                idx, valid = choice.run("dsa_topk", index_scores, start_pos + t0, k_sel)
            with part("attn.core", self):
                if self.masked and q.shape[2] > 1:
                    o, probs = self._masked_chunk(q[:, :, sl], kv[:, :keys], idx, valid)
                else:
                    # The chunk's first query has ≥ k_sel causal keys: every pick is causal (ties go to
                    # the lower positions, the future's -inf last; unless a score is NaN), no mask to apply.
                    every_pick_causal = start_pos + t0 + 1 >= k_sel
                    o, probs = choice.run("dsa_attention", q[:, :, sl], kv, idx, None if every_pick_causal else valid, self.scale, d.Dc,
                                          need_probs=train_indexer, buffer=rows)
                outs.append(o)
            if train_indexer:
                p = probs.detach().float()  # (B, t, K): summed over heads
                kl_terms.append(kl_to_indexer(p / p.sum(-1, keepdim=True).clamp_min(1e-30), torch.gather(index_scores, -1, idx), valid)
                                * idx.shape[1])
        if train_indexer:
            self.kl_loss = torch.stack(kl_terms).sum() / q.shape[2]
        _, w_uv = self._up_weights()
        with part("attn.proj", self):
            o = torch.einsum("bhtc,hvc->bhtv", outs[0] if len(outs) == 1 else torch.cat(outs, dim=2), w_uv)
        return self._out(o)

    def _masked_chunk(self, q, kv, idx, valid):
        """The same attention from dense latent scores with every unselected key masked."""
        B, t, S = idx.shape[0], idx.shape[1], kv.shape[1]
        keep = torch.zeros(B, t, S, dtype=torch.bool, device=kv.device).scatter_(-1, idx, valid)
        scores = torch.einsum("bhtc,bsc->bhts", q, kv) * self.scale
        probs = scores.masked_fill(~keep[:, None], float("-inf")).float().softmax(dim=-1).type_as(kv)
        o = torch.einsum("bhts,bsc->bhtc", probs, kv[..., :self.dims.Dc])
        return o, torch.gather(probs.sum(dim=1), -1, idx)

    def _dense_kl(self, x, q_latent, start_pos, q_idx, w_idx, k_all) -> torch.Tensor:
        """The warm-up's KL target: the main attention over every causal key, summed over heads
        and L1-normalised (detached), against the indexer's scores (V3.2 eq. 3)."""
        with torch.no_grad():
            p = dense_attention_mass(self, x, q_latent, start_pos)  # (B, T, S)
        T, S = p.shape[1], p.shape[2]
        allowed = torch.arange(S, device=x.device)[None, :] <= torch.arange(start_pos, start_pos + T, device=x.device)[:, None]
        return kl_to_indexer(p, self.indexer.score(q_idx, w_idx, k_all), allowed.expand_as(p))


def dense_attention_mass(module: DeepSeekSparseAttention, x: torch.Tensor, q_latent: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """The main attention's probabilities over every causal key of a fresh sequence (start_pos 0
    or the tokens given), summed over heads and L1-normalised: (B, T, S)."""
    kv = module._latent_rows(x, start_pos, None)
    q = module._latent_queries(q_latent, start_pos)
    scores = torch.einsum("bhtc,bsc->bhts", q, kv) * module.scale
    T, S = q.shape[2], kv.shape[1]
    allowed = torch.arange(S, device=x.device)[None, :] <= torch.arange(start_pos, start_pos + T, device=x.device)[:, None]
    p = scores.masked_fill(~allowed, float("-inf")).float().softmax(dim=-1).sum(dim=1)
    return p / p.sum(dim=-1, keepdim=True)
