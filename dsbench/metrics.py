"""The metric registry: one entry per cells.parquet column — what it is, its unit, how the report
shows it, which way is better, whether it depends on the machine, and how `dsbench check` compares
it by default.

    METRICS["tokens_per_s_median"].better      # 'higher'
    host_dependent_columns()                   # what `dsbench baseline` strips
    default_check_rules()                      # the [metrics] table of the default check policy
    python -m dsbench.metrics --markdown       # the results-schema table of docs/metrics.md

Groups: `identity` (which cell, its outcome status), `axis` (the sweep's axes), `config` (the
resolved model, workload and measurement settings), `variant` (config that a variant owns: `owner`
names the axis whose value decides it, e.g. n_kv_heads for attention — dsbench.pairing does not
hold those against a pair along that axis), `accounting` (analytic, exact), and the measured
groups. identity, axis, config and variant columns say what a cell *is*; the rest what it *did*.

host_dependent: the value depends on the machine the cell ran on or on its load (timings, rates,
memory peaks, energy, contention, threads, wall times), so it never belongs in a baseline shared
between machines. check: exact | relative | absolute (with `tolerance`, failing in direction
`worse`) | timing (compared by the policy's [timing] rules when it names the column) | none.
A new column needs an entry here: tests/test_metrics.py runs a sweep and fails on any column
without one.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from dsbench.schema import AXES, DOTTED_MEASURE_KEYS, WORKLOAD_SECTIONS, dotted_sections

GROUPS = ("identity", "axis", "config", "variant", "accounting", "speed", "memory", "energy", "loss", "balance", "fp8",
          "speculative", "flag", "contention", "overhead", "profile", "implementation", "sol")
DESCRIBES_THE_CELL = ("axis", "config", "variant")  # what a cell is: the identity dsbench.pairing compares
FORMATS = ("int", "g", "mib", "pct", "ratio", "text", "bool")
BETTER = ("higher", "lower", "none")
CHECKS = ("exact", "relative", "absolute", "timing", "none")


@dataclass(frozen=True)
class Metric:
    name: str
    group: str
    unit: str  # "" for text and flags; "1" for a dimensionless number
    description: str
    fmt: str = "g"  # how the report prints it (dsbench.report.data.fmt_num)
    better: str = "none"
    host_dependent: bool = False
    check: str = "none"
    tolerance: float = 0.0  # relative: × |baseline|; absolute: in the column's unit
    worse: str = "both"  # the direction of change that fails a tolerance rule: both | higher | lower
    owner: str = ""  # variant config: the axis whose value decides it
    short: str = ""  # header in the report's cells table; "" = not in that table

    def policy_rule(self) -> dict | None:
        """This metric's default in the check policy's [metrics] table, or None."""
        if self.check == "exact":
            return {"rule": "exact"}
        if self.check in ("relative", "absolute"):
            return {"rule": self.check, "tolerance": self.tolerance, "worse": self.worse}
        return None


def _m(name, group, unit, description, **kw) -> Metric:
    return Metric(name, group, unit, description, **kw)


def _cell(name, unit, description, **kw) -> Metric:
    return _m(name, kw.pop("group", "config"), unit, description, **kw)


def _host(name, group, unit, description, **kw) -> Metric:
    return _m(name, group, unit, description, host_dependent=True, **kw)


# Seeded losses are bit-identical on one CPU build and ISA. Across hosts and ISAs (the `ci` preset,
# 60 steps): fp32 identical to 1e-6; bf16 moved by at most 0.082% (Intel AVX-512 vs
# ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2, and vs an AMD EPYC without AVX-512).
# 0.5% is 6× that, and a real numerics change of 1% still fails. On GPUs measure your own spread.
LOSS = {"check": "relative", "tolerance": 0.005, "better": "lower"}
EXACT = {"check": "exact"}
TIMING = {"check": "timing", "better": "lower"}

_ENTRIES = (
    _m("run_id", "identity", "", "the run the cell belongs to", fmt="text"),
    _m("cell_id", "identity", "", "hash of the resolved config (stable across runs)", fmt="text"),
    _m("cell_index", "identity", "", "position in the sweep's order", fmt="int"),
    _m("label", "identity", "", "workload/ffn/attention/precision[/balance] shape", fmt="text"),
    _m("status", "identity", "", "ok | oom | error | timeout | diverged | killed (SIGKILL, not known to be the OOM killer) | preempted | cancelled | node_fail", fmt="text"),
    _m("error", "identity", "", "the error's last line (failed cells)", fmt="text"),
    *(_cell(a, "", f"axis: {a}", group="axis", fmt="text") for a in AXES),
    _cell("device", "", "axis: cpu | cuda", group="axis", fmt="text"),
    _cell("d_model", "1", "model width", fmt="int"),
    _cell("n_layers", "1", "decoder layers", fmt="int"),
    _cell("n_heads", "1", "query heads", fmt="int"),
    _cell("head_dim", "1", "per-head width", fmt="int"),
    _cell("d_ff", "1", "dense SwiGLU hidden width (the base routed FFNs are built from)", fmt="int"),
    _cell("vocab_size", "1", "vocabulary (256: bytes)", fmt="int"),
    _cell("max_seq_len", "tokens", "longest position the model holds", fmt="int"),
    _cell("batch_size", "sequences", "sequences per step", fmt="int"),
    _cell("seq_len", "tokens", "train/prefill sequence length", fmt="int"),
    _cell("context_len", "tokens", "decode: tokens in the cache before decoding", fmt="int"),
    _cell("new_tokens", "tokens", "decode: tokens generated per sequence", fmt="int"),
    _cell("steps", "1", "train steps", fmt="int"),
    _cell("lr", "1", "peak learning rate"),
    _cell("warmup_steps", "1", "measure.warmup: untimed steps first", fmt="int"),
    _cell("repeats", "1", "measure.repeats: timed steps (prefill/decode)", fmt="int"),
    _cell("replicate", "1", "which process of a cell run in several (measure.replicates)", fmt="int"),
    _cell("ep", "1", "parallel.ep: expert-parallel ranks the cell ran on (1: one process)", fmt="int"),
    _cell("redundant_experts", "1", "parallel.redundant_experts: EPLB replicas placed from the measured load (0: none)", fmt="int"),
    _cell("seed", "1", "the cell's seed", fmt="int"),
    _cell("data", "", "corpus: synthetic or a path", fmt="text"),
    _cell("data_digest", "", "a data file's sha256 (over 256 MiB: 'sampled:' its size, head and tail); empty for the synthetic corpora", fmt="text"),
    _cell("mtp", "1", "multi-token-prediction modules D (V3 §2.2; 0: none)", fmt="int"),
    _cell("mtp_lambda", "1", "train: λ of L_MTP = (λ/D)·Σ_k L_MTP^k (V3 eq. 25; mtp ≥ 1 only)"),
    _cell("train_steps", "1", "speculative: steps the model (MTP modules included) trained before decoding", fmt="int"),
    _cell("memory_budget_bytes", "bytes", "max-batch decode: the budget the batch was fitted into", fmt="mib"),
    _m("params_total", "accounting", "parameters", "every parameter (embedding, all experts, head)", fmt="int", **EXACT),
    _m("params_active", "accounting", "parameters", "what one token multiplies with (the embedding lookup not counted)",
       fmt="int", short="params active", **EXACT),
    _m("params_embedding", "accounting", "parameters", "the input embedding table", fmt="int", **EXACT),
    _m("params_mtp", "accounting", "parameters", "the MTP modules' own parameters, not in params_total (V3's 671B excludes them; "
       "embedding and head shared)", fmt="int", **EXACT),
    _m("flops_per_token", "accounting", "FLOP/token", "analytic, activated parameters only (flops_convention); train: MTP included", **EXACT),
    _m("flops_per_token_mtp", "accounting", "FLOP/token", "the MTP modules' share of flops_per_token (without MTP: the difference)",
       **EXACT),
    _m("flops_convention", "accounting", "", "how flops_per_token counts", fmt="text"),
    _m("kv_cache_bytes_per_token", "accounting", "bytes/token", "analytic KV-cache bytes per token, all layers",
       fmt="int", better="lower", short="KV B/token", **EXACT),
    _m("kv_cache_bytes_at_context", "accounting", "bytes", "analytic KV cache of one sequence at the cell's context "
       "(decode: context_len, prefill: seq_len), all layers, a constant part (V4's window) included", fmt="int",
       better="lower", **EXACT),
    _m("tokens_per_step", "accounting", "tokens", "tokens one timed step processes", fmt="int", **EXACT),
    _m("weights_bytes", "accounting", "bytes", "max-batch decode: weight bytes the budget fit counted", fmt="mib", **EXACT),
    _m("kv_cache_bytes", "accounting", "bytes", "max-batch decode: the whole batch's cache at full length", fmt="mib", **EXACT),
    _m("kv_cache_bytes_per_token_measured", "memory", "bytes/token", "measured from the live caches (prefill/decode)",
       fmt="int", better="lower", **EXACT),
    _m("kv_cache_bytes_at_context_measured", "memory", "bytes", "decode: one sequence's cache at context_len, read off "
       "the live caches' tensors (a cache with a constant part reports what it holds there)", fmt="int", better="lower", **EXACT),
    _host("tokens_per_s_median", "speed", "tokens/s", "tokens_per_step ÷ the median step time", fmt="int", better="higher",
          short="tokens/s"),
    _host("tokens_per_s_p10", "speed", "tokens/s", "tokens_per_step ÷ the p90 step time", fmt="int", better="higher",
          short="tokens/s p10"),
    _host("tokens_per_s_p90", "speed", "tokens/s", "tokens_per_step ÷ the p10 step time", fmt="int", better="higher",
          short="tokens/s p90"),
    _host("step_time_ms_median", "speed", "ms", "median timed step (warm-up excluded)", short="step ms", **TIMING),
    _host("step_time_ms_p10", "speed", "ms", "10th percentile of the timed steps", **TIMING),
    _host("step_time_ms_p90", "speed", "ms", "90th percentile of the timed steps", **TIMING),
    _host("step_time_ms_mean", "speed", "ms", "mean timed step", **TIMING),
    _host("step_time_ms_min", "speed", "ms", "fastest timed step; added by `dsbench check` from series.parquet", **TIMING),
    _host("step_time_source", "speed", "", "added by `dsbench check`: where step_time_ms_min came from", fmt="text"),
    _host("step_time_n", "speed", "steps", "timed steps (travels with the timings)", fmt="int"),
    _host("step_time_spread", "speed", "1", "p90 ÷ p10 of the step times (contention.SPREAD_LIMIT flags noisy cells)"),
    _host("measured_work_s", "speed", "s", "sum of the timed steps"),
    _host("prefill_time_ms", "speed", "ms", "decode: median prefill of the context", better="lower"),
    _host("model_flops_per_s", "speed", "FLOP/s", "flops_per_token × tokens/s", better="higher"),
    _host("peak_flops_per_s", "speed", "FLOP/s", "peak of the arithmetic in use (peak_source)"),
    _host("peak_source", "speed", "", "datasheet or this machine's calibrated matmul", fmt="text"),
    _m("sol_bound", "sol", "", "compute | memory: the side holding most of the light-speed step (dsbench/roofline.py light_columns)",
       fmt="text"),
    _host("sol_step_ms", "sol", "ms", "light-speed step: Σ over parts of max(FLOPs ÷ peak, bytes ÷ bandwidth) at this device's "
          "ceilings", better="lower"),
    _host("sol_fraction", "sol", "1", "light-speed step ÷ measured median step: 1 at the roof", fmt="pct", better="higher",
          short="SoL"),
    _host("sol_note", "sol", "", "why the bound is missing, above 1, or the cell launch-bound", fmt="text"),
    _host("achieved_bytes_per_s", "sol", "B/s", "the step's compulsory bytes ÷ median step time", better="higher"),
    _host("mbu", "sol", "1", "model bandwidth utilisation: achieved_bytes_per_s ÷ calibrated copy bandwidth", fmt="pct",
          better="higher"),
    _host("s_mfu", "sol", "1", "routed FFN cells: MoE-CAP's sparsity-aware MFU (activated experts' FLOPs only)", fmt="pct",
          better="higher"),
    _host("s_mbu", "sol", "1", "routed FFN cells: MoE-CAP's sparsity-aware MBU (weights of the experts the step touches)",
          fmt="pct", better="higher"),
    _host("mfu", "speed", "1", "model_flops_per_s ÷ peak_flops_per_s (ep > 1: ÷ ep peaks, one per rank)", fmt="pct",
          better="higher", short="MFU"),
    # Expert parallelism (dsbench/distributed.py): tokens_per_s_median of an ep cell counts every rank's batch.
    _host("a2a_dispatch_ms", "speed", "ms", "ep > 1: per timed step, summed over MoE layers, the token counts' and rows' "
          "all_to_all_single out to the experts' ranks (train: and its backward); perf_counter around each collective "
          "(CUDA: synchronized before and after), so waiting for the slowest rank is in it; mean over ranks", better="lower"),
    _host("a2a_combine_ms", "speed", "ms", "ep > 1: as a2a_dispatch_ms, the expert outputs' all_to_all_single back "
          "(train: and its backward)", better="lower"),
    _host("a2a_share", "speed", "1", "ep > 1: (a2a_dispatch_ms + a2a_combine_ms) ÷ the mean timed step (means over ranks); "
          "on a CPU gloo moves the rows through shared memory, not a network", fmt="pct", better="lower"),
    _host("tokens_per_s_per_rank", "speed", "tokens/s", "ep > 1: a rank's batch_size × seq_len ÷ its median step, mean over ranks",
          fmt="int", better="higher"),
    _m("a2a_bytes_per_token", "balance", "bytes/token", "ep > 1: row bytes a rank sends to other ranks per token it routes "
       "(dispatch and combine, train: forward and backward; its rows to itself and the counts not included), mean over ranks",
       better="lower"),
    _m("ep_straggler_factor", "balance", "1", "ep > 1: max ÷ mean over ranks of the rows their experts received over the "
       "timed steps, per MoE layer, mean over layers (1: balanced ranks)", better="lower"),
    _m("ep_straggler_factor_eplb", "balance", "1", "parallel.redundant_experts > 0: ep_straggler_factor measured with the "
       "EPLB placement (replicas of hot experts, each sender splitting an expert's rows evenly over them); "
       "ep_straggler_factor is then what contiguous blocks would have given the same timed forwards", better="lower"),
    _m("ranks_per_token", "balance", "ranks", "ep > 1: distinct ranks a token's routed experts sit on, mean over tokens "
       "(device-limited routing: ≤ topk_group when n_group = ep)", better="lower"),
    # Peak memory moves ~1.5% between processes on one machine; only growth fails.
    _host("peak_mem_bytes", "memory", "bytes", "CUDA max allocated on a GPU, peak RSS on a CPU", fmt="mib", better="lower",
          check="relative", tolerance=0.15, worse="higher", short="peak MiB"),
    _host("peak_rss_bytes", "memory", "bytes", "peak RSS of the cell's process", fmt="mib", better="lower"),
    # Analytic, before the cell runs (dsbench/memory_estimate.py): an approximation, so never checked.
    _m("memory_estimate_bytes", "memory", "bytes", "estimated peak of the cell's own tensors (per rank), compare with "
       "peak_mem_bytes: weights + optimizer state + max(activations + logits + KV cache, gradients); the runner "
       "refuses a cell above the memory available (--force runs it)", fmt="mib", short="est. MiB"),
    _m("memory_estimate_weights_bytes", "memory", "bytes", "memory_estimate_bytes' weights (train: FP32 masters and "
       "autocast's low-precision copy; inference: the inference dtype)", fmt="mib"),
    _m("memory_estimate_optimizer_bytes", "memory", "bytes", "memory_estimate_bytes' gradients and AdamW state "
       "(FP32, and foreach AdamW's one parameter-sized temporary)", fmt="mib"),
    _m("memory_estimate_activations_bytes", "memory", "bytes", "memory_estimate_bytes' activations kept for backward "
       "(train) or one layer's transients (inference), and the logits", fmt="mib"),
    _m("memory_estimate_kv_cache_bytes", "memory", "bytes", "memory_estimate_bytes' KV cache (batch × cache slots)",
       fmt="mib"),
    _host("rss_before_workload_bytes", "memory", "bytes", "RSS after building the model, before the workload", fmt="mib"),
    _host("cuda_max_allocated_bytes", "memory", "bytes", "torch.cuda.max_memory_allocated", fmt="mib", better="lower"),
    _host("cuda_max_reserved_bytes", "memory", "bytes", "torch.cuda.max_memory_reserved", fmt="mib", better="lower"),
    _host("gpu_busy_fraction", "sol", "1", "CUDA: NVML's share of the workload's time in which a kernel ran (low: launch-bound)",
          fmt="pct", better="higher"),
    _host("gpu_mem_used_bytes_max", "memory", "bytes", "NVML device memory used, max", fmt="mib", better="lower"),
    _host("power_w_mean", "energy", "W", "NVML power, mean over the workload"),
    _host("power_w_max", "energy", "W", "NVML power, max"),
    _host("energy_j", "energy", "J", "NVML energy over the workload", better="lower"),
    _host("energy_j_per_token", "energy", "J/token", "energy_j ÷ tokens processed", better="lower"),
    _host("energy_source", "energy", "", "how energy was read (absent: null)", fmt="text"),
    _m("first_loss", "loss", "nats/token", "training loss at step 0", **LOSS),
    _m("final_loss", "loss", "nats/token", "training loss, mean of the last 10% of steps", short="final loss", **LOSS),
    _m("eval_loss", "loss", "nats/token", "held-out split (last 10% of each corpus); the main head alone with MTP",
       short="eval loss", **LOSS),
    _m("final_loss_mtp", "loss", "nats/token", "MTP: (1/D)·Σ_k L_MTP^k, mean of the last 10% of steps", **LOSS),
    _m("eval_loss_mtp", "loss", "nats/token", "MTP: (1/D)·Σ_k of each depth's loss on the held-out batches", **LOSS),
    _m("pretrain_source", "speculative", "", "trained | loaded <key> (an earlier cell's identical training) | untrained",
       fmt="text"),
    _m("pretrain_final_loss", "loss", "nats/token", "speculative: the main head's training loss at the end of its pre-training",
       **LOSS),
    *(_m(f"accept_rate_pos{k}", "speculative", "1", f"P(draft {k} accepted | drafts before it accepted), every row of every round"
         + (" (V3 §5.4.3: 85–90% for the second token)" if k == 1 else ""), fmt="pct", better="higher")
      for k in range(1, 9)),
    *(_m(f"eval_agreement_pos{k}", "speculative", "1", f"draft {k} equals the main model's argmax on held-out text "
         "(teacher-forced: acceptance without greedy loops)", fmt="pct", better="higher") for k in range(1, 9)),
    _m("greedy_distinct_fraction", "speculative", "1", "distinct tokens ÷ tokens in a row's greedy output (low: it loops)",
       fmt="pct"),
    _m("kv_cache_bytes_per_token_mtp", "memory", "bytes/token", "speculative: the MTP modules' own caches, measured",
       fmt="int", better="lower", **EXACT),
    _m("accepted_len_mean", "speculative", "tokens", "tokens emitted per verify forward (1 … mtp+1)", better="higher"),
    _m("spec_matches_greedy", "speculative", "", "the speculative tokens equal plain greedy decoding's in every round", fmt="bool"),
    _host("spec_tokens_per_s", "speculative", "tokens/s", "speculative rounds: generated tokens ÷ their draft + verify time",
          fmt="int", better="higher"),
    _host("plain_tokens_per_s", "speculative", "tokens/s", "plain greedy rounds of the same cell: generated tokens ÷ their step time",
          fmt="int", better="higher"),
    _host("spec_speedup", "speculative", "1", "spec_tokens_per_s ÷ plain_tokens_per_s (V3 §5.4.3: 1.8×)", fmt="ratio",
          better="higher"),
    _host("verify_time_ms_median", "speculative", "ms", "one main forward over [last token, drafts]", better="lower"),
    _host("draft_time_ms_median", "speculative", "ms", "the MTP modules' drafting of one round", better="lower"),
    _host("plain_token_time_ms_median", "speculative", "ms", "one plain greedy decode step", better="lower"),
    _host("verify_cost_ratio", "speculative", "1", "verify_time_ms_median ÷ plain_token_time_ms_median", fmt="ratio",
          better="lower"),
    # MaxVio is a fraction, so an absolute tolerance; only worse balance fails.
    _m("maxvio_global", "balance", "1", "(max − mean expert load) ÷ mean on the held-out forwards, mean over layers",
       better="lower", check="absolute", tolerance=0.05, worse="higher", short="MaxVio"),
    *(_m(n, "balance", "1", d, better="lower") for n, d in (
        ("maxvio_global_max", "maxvio_global, worst layer"), ("maxvio_global_p50", "maxvio_global, median layer"),
        ("maxvio_global_p90", "maxvio_global, 90th percentile layer"),
        ("maxvio_batch_mean", "MaxVio per training batch, mean over steps and layers"),
        ("maxvio_batch_final", "MaxVio of the last training batch, mean over layers"),
        ("maxvio_train", "MaxVio of the loads summed over training"),
        ("dead_expert_fraction", "experts that received no token in training"),
        ("dropped_fraction", "tokens dropped above expert capacity"))),
    _m("maxvio_global_source", "balance", "", "eval | inference | train: which forwards maxvio_global sums", fmt="text"),
    _m("router_entropy", "balance", "nats", "mean routing entropy per token"),
    _m("aux_loss_final", "balance", "1", "the auxiliary balance loss at the last step (balance = aux)"),
    *(_m(f"sqnr_{k}_db{s}", "fp8", "dB", f"{what} quantisation SQNR, {agg} over FP8 linears", better="higher")
      for k, what in (("act", "activation"), ("weight", "weight"), ("grad", "output-gradient"))
      for s, agg in (("", "mean"), ("_min", "worst"))),
    _m("fp8_activation_bytes", "fp8", "bytes", "FP8 activation cache per step", fmt="mib", better="lower"),
    _m("fp8_activation_bytes_saved", "fp8", "bytes", "bytes the FP8 activation cache saves per step vs BF16", fmt="mib",
       better="higher"),
    # Flags a reader needs to interpret the speeds; kept in a baseline so its rows say what they were.
    _m("emulated", "flag", "", "FP8 without FP8 tensor cores: right numerics, meaningless speed", fmt="bool"),
    _m("speed_note", "flag", "", "why this row's speed does not predict a GPU (bf16 on a CPU)", fmt="text"),
    _host("cpu_share", "contention", "1", "CPU time the cell got ÷ (wall × threads)", better="higher"),
    _host("cpu_others_cores", "contention", "cores", "cores other processes kept busy meanwhile", better="lower"),
    _host("cpu_steal_fraction", "contention", "1", "hypervisor steal time", better="lower"),
    _host("ctx_switches_involuntary_per_s", "contention", "1/s", "involuntary context switches", better="lower"),
    _host("loadavg_1m", "contention", "1", "1-minute load average at the end"),
    _host("contended", "contention", "", "the cell did not get the CPU it asked for", fmt="bool"),
    _host("contention", "contention", "", "why it is flagged contended", fmt="text"),
    _host("torch_num_threads", "contention", "threads", "torch intra-op threads", fmt="int"),
    _host("threads_source", "contention", "", "how the thread count was chosen", fmt="text"),
    _host("worker_startup_s", "overhead", "s", "subprocess start to cell start"),
    _cell("compile_mode", "", "compile | compile-graphs (dsbench/compiled.py); eager cells have none", fmt="text", owner="measure.compile"),
    _host("compile_s", "overhead", "s", "compiled cells: wall time of the steps during which torch.compile compiled or recorded a "
          "CUDA graph (dropped from the samples)", better="lower"),
    _m("compiles", "overhead", "1", "compiled cells: frames dynamo converted, recompilations and graph-break resumes included", fmt="int"),
    _m("compile_steps", "overhead", "steps", "compiled cells: steps dropped from the samples because something compiled in them", fmt="int"),
    _m("timed_compile_steps", "overhead", "steps", "compiled cells: of those, steps past the warm-up (recompilation while timed)",
       fmt="int", better="lower"),
    _m("compile_settled", "flag", "", "compiled cells: false when the cell still compiled after its extra rounds "
       "(compiled.SETTLE_LIMIT): its samples are fewer than asked", fmt="bool"),
    _m("graph_breaks", "overhead", "1", "compiled cells: graph breaks dynamo counted (the code between ran eager)", fmt="int", better="lower"),
    _m("graph_break_reasons", "overhead", "", "compiled cells: the most frequent graph-break reasons, with counts", fmt="text"),
    _m("cudagraph_recordings", "overhead", "1", "compile-graphs cells: CUDA graphs recorded (one per distinct shape)", fmt="int"),
    _host("setup_s", "overhead", "s", "model build and data"),
    _host("workload_wall_s", "overhead", "s", "the workload's wall time"),
    _host("cell_wall_s", "overhead", "s", "the cell's wall time, start to fragment"),
    _host("queue_wait_s", "overhead", "s", "executor slurm: submission to the job's start (the node's clock against the submitter's)"),
    _host("slurm_job_id", "identity", "", "executor slurm: the job that ran the cell (its submitit logs: <out>/slurm/<id>_*)", fmt="text"),
    _host("profile_dir", "profile", "", "profiled cells: the profile's folder (relative to the results)", fmt="text"),
    _host("profile_overhead", "profile", "1", "profiled ÷ measured step time − 1", fmt="pct"),
    _host("profile_coverage", "profile", "1", "share of the step inside named part ranges", fmt="pct"),
    _host("profile_step_ms", "profile", "ms", "step time under the profiler"),
)

METRICS: dict[str, Metric] = {}


class MetricError(ValueError):
    """A registry entry that cannot be used, in one line."""


def register(metric: Metric) -> Metric:
    """Add a column (a user's variant registers the columns its rows add); one entry per name."""
    for field, value, allowed in (("group", metric.group, GROUPS), ("fmt", metric.fmt, FORMATS),
                                  ("better", metric.better, BETTER), ("check", metric.check, CHECKS)):
        if value not in allowed:
            raise MetricError(f"metric {metric.name!r}: {field} = {value!r}; allowed: {', '.join(allowed)}")
    if metric.name in METRICS:
        raise MetricError(f"metric {metric.name!r} is registered twice")
    METRICS[metric.name] = metric
    return metric


for _entry in _ENTRIES:
    register(_entry)


def variant_column(name: str, owner: str, unit: str, description: str, fmt: str = "g", **kw) -> Metric:
    """A column of a variant's own config (group `variant`, decided by the `owner` axis)."""
    return Metric(name, "variant", unit, description, fmt=fmt, owner=owner, **kw)


def declare(metric: Metric) -> Metric:
    """A variant's column (variants/base.py Part.metric_columns), registered with the variant:
    listed after its group's last column (or before the groups after it), so the schema table
    keeps a group together; the same definition twice (one module behind several axis values)
    is one entry."""
    if METRICS.get(metric.name) == metric:
        return metric
    names, later = list(METRICS), GROUPS[GROUPS.index(metric.group) + 1:] if metric.group in GROUPS else ()
    peers = [i for i, name in enumerate(names) if METRICS[name].group == metric.group]
    at = peers[-1] + 1 if peers else next((i for i, name in enumerate(names) if METRICS[name].group in later), len(names))
    register(metric)
    items = list(METRICS.items())
    items.insert(at, items.pop())
    METRICS.clear()
    METRICS.update(items)
    return metric


def dotted_axis(name: str) -> Metric | None:
    """A dotted-key axis column ("model.size", "ffn.n_experts"): named by the spec, so registered
    by its form rather than one entry each."""
    section, dot, field = name.partition(".")
    if not (dot and field) or (section == "measure" and field not in DOTTED_MEASURE_KEYS):
        return None
    if section not in dotted_sections(()) and section not in _workload_names():
        return None
    return Metric(name, "axis", "", f"dotted-key axis: the cell's [{section}] {field} (n/a where its variant or workload does not read it)",
                  fmt="text")


def _workload_names() -> tuple[str, ...]:
    """The registered workloads' sections (they register themselves in dsbench.schema). Where this
    process has not imported them yet, import them now (it loads torch): only a dotted column of a
    workload's section asks, and the workloads import the variants, which import this module."""
    if not WORKLOAD_SECTIONS:
        importlib.import_module("dsbench.workloads")
    return tuple(WORKLOAD_SECTIONS)


def kernel_column(name: str) -> Metric | None:
    """kernel_<family> / kernel_<family>_why (dsbench/kernels/choice.py Chooser.columns): one
    pair per op family a cell called, registered by their form."""
    if not name.startswith("kernel_") or len(name) <= len("kernel_"):
        return None
    if name.endswith("_why"):
        return Metric(name, "implementation", "", "why that implementation ran: pinned, or auto's measurement "
                      "(each candidate's median µs and error vs the reference) and why others did not run", fmt="text")
    return Metric(name, "implementation", "", "the implementation of this op family the cell's calls ran "
                  "(kernels.<family>: pinned, or auto's pick; mixed: several)", fmt="text")


def metric_of(name: str) -> Metric | None:
    """The registry entry of a column, dotted-key axes and kernel columns included; None if unregistered."""
    return METRICS.get(name) or dotted_axis(name) or kernel_column(name)


def describing_columns() -> tuple[str, ...]:
    """Columns that say what a cell is (axes, config, variant config): a pair's identity."""
    return tuple(m.name for m in METRICS.values() if m.group in DESCRIBES_THE_CELL)


def owned_by(axis: str) -> tuple[str, ...]:
    """Variant config decided by `axis` (n_kv_heads by attention, the expert layout by ffn)."""
    return tuple(m.name for m in METRICS.values() if m.owner == axis)


def host_dependent_columns() -> tuple[str, ...]:
    return tuple(m.name for m in METRICS.values() if m.host_dependent)


def table_columns() -> list[Metric]:
    """The report's cells table, in registry order."""
    return [m for m in METRICS.values() if m.short]


def default_check_rules() -> dict[str, dict]:
    """The check policy's default [metrics] table: {column: {rule, tolerance, worse}}."""
    return {m.name: rule for m in METRICS.values() if (rule := m.policy_rule()) is not None}


def timing_columns() -> tuple[str, ...]:
    return tuple(m.name for m in METRICS.values() if m.check == "timing")


def markdown_table() -> str:
    """The results-schema table of docs/metrics.md."""
    lines = ["| column | group | unit | better | host-dependent | check | what |", "|---|---|---|---|---|---|---|"]
    for m in METRICS.values():
        check = m.check if m.check not in ("relative", "absolute") else _tolerance(m)
        group = f"{m.group} ({m.owner})" if m.owner else m.group
        lines.append(f"| `{m.name}` | {group} | {m.unit or '–'} | {m.better if m.better != 'none' else '–'} | "
                     f"{'yes' if m.host_dependent else '–'} | {check if check != 'none' else '–'} | {m.description.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def _tolerance(m: Metric) -> str:
    sign = {"both": "±", "higher": "+", "lower": "−"}[m.worse]
    return f"{sign}{m.tolerance:.1%}" if m.check == "relative" else f"{sign}{m.tolerance:g}"


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        print("usage: python -m dsbench.metrics --markdown", file=sys.stderr)
        return 2
    # The variants declare their own columns when registered; loaded here, at run time, so that
    # importing this module never loads torch. They declare them in dsbench.metrics, which under
    # `python -m` is another module object than this __main__: print that one's table.
    importlib.import_module("dsbench.variants.registry")
    print(importlib.import_module("dsbench.metrics").markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
