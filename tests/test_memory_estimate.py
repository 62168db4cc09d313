"""The pre-flight memory estimate (issue 19, class 7): against measured peaks of real cells, the
refusal of a cell that cannot fit (one line, exit 2, nothing written), --force, the columns."""

from __future__ import annotations

import pytest
import torch

from dsbench import memory_estimate
from dsbench import spec as spec_lib
from dsbench.memory_estimate import estimate, held_weight_bytes
from dsbench.results import load_results
from dsbench.runner import run_sweep
from dsbench.variants import decoder
from tests.test_cli import assert_usage_error, dsbench_in_process

# measured ÷ estimate. CUDA max_memory_allocated counts the same tensors the estimate does.
# A CPU's peak RSS adds what the allocator keeps of freed blocks and oneDNN's scratch buffers
# (the profiler's allocation curve of the same train cell is within 5% of the estimate).
RATIO_CUDA = (1 / 1.5, 1.5)
RATIO_CPU_RSS = (1 / 1.5, 3.0)


def _spec(device: str, **sections):
    raw = {"name": "mem", "device": device, "seed": 0, "model": {"size": "small"},
           "axes": {"workload": ["train", "prefill", "decode"], "ffn": ["dense", "deepseekmoe"], "attention": ["mha", "mla"],
                    "precision": ["fp32"], "balance": ["bias"]},
           "train": {"steps": 2, "batch_size": 4, "seq_len": 256, "eval_batches": 0},
           "prefill": {"batch_size": 8, "seq_lens": [512]},
           "decode": {"batch_size": 16, "context_lens": [512], "new_tokens": 2},
           "measure": {"warmup": 1, "repeats": 2, "timeout_s": 600}, **sections}
    return spec_lib.parse_spec(raw)


def _ratios(spec, out, device: str) -> dict[str, float]:
    run_sweep(spec, out=out)
    cells = {c.cell_id: c for c in spec_lib.expand(spec, device)}
    ratios = {}
    for _, row in load_results(out).cells.iterrows():
        assert row["status"] == "ok", (row["label"], row["error"])
        cell = cells[row["cell_id"]]
        assert row["memory_estimate_bytes"] == estimate(cell).total_bytes  # the column lands, as computed
        if device == "cuda":
            measured = row["cuda_max_allocated_bytes"]
        else:  # peak RSS less the process's baseline (its RSS before the workload, less the weights it held)
            measured = row["peak_mem_bytes"] - (row["rss_before_workload_bytes"] - held_weight_bytes(cell))
        ratios[row["label"]] = measured / row["memory_estimate_bytes"]
        print(f"{row['label']}: estimate {row['memory_estimate_bytes'] / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
              f"({'cuda_max_allocated' if device == 'cuda' else 'peak RSS − baseline'}), measured/estimate {ratios[row['label']]:.2f}")
    return ratios


@pytest.mark.slow
def test_estimate_is_within_a_factor_of_the_measured_cpu_peak(tmp_path):
    spec = _spec("cpu", axes={"workload": ["train", "prefill", "decode"], "ffn": ["dense"], "attention": ["mha", "mla"],
                              "precision": ["fp32"]})
    ratios = _ratios(spec, tmp_path / "run", "cpu")
    assert len(ratios) == 6
    low, high = RATIO_CPU_RSS
    assert all(low <= r <= high for r in ratios.values()), ratios


@pytest.mark.gpu
def test_estimate_is_within_a_factor_of_cuda_max_allocated(tmp_path):
    spec = _spec("cuda", axes={"workload": ["train", "prefill", "decode"], "ffn": ["deepseekmoe"], "attention": ["mha", "mla"],
                               "precision": ["bf16"], "balance": ["bias"]},
                 train={"steps": 2, "batch_size": 8, "seq_len": 1024, "eval_batches": 0},
                 prefill={"batch_size": 8, "seq_lens": [1024]})
    ratios = _ratios(spec, tmp_path / "run", "cuda")
    low, high = RATIO_CUDA
    assert all(low <= r <= high for r in ratios.values()), ratios


# --- the parts, exactly where they are counts ---


@pytest.mark.parametrize("workload, precision, weights_per_param, optimizer_per_param", [
    ("train", "fp32", 4, 3 * 4 + 4),  # FP32 masters; grads + foreach temporary + exp_avg, exp_avg_sq (the columns' sum)
    ("train", "bf16", 4 + 2, 3 * 4 + 4),  # plus autocast's BF16 copy
    ("prefill", "fp32", 4, 0),
    ("prefill", "bf16", 2, 0),
    ("decode", "bf16", 2, 0),
])
def test_weights_and_optimizer_state_per_parameter(workload, precision, weights_per_param, optimizer_per_param):
    spec = _spec("cpu", axes={"workload": [workload], "ffn": ["dense"], "attention": ["mha"], "precision": [precision]})
    cell = spec_lib.expand(spec, "cpu")[0]
    counts = decoder.param_counts(cell.model)
    params = counts["params_total"] + counts["params_mtp"]
    columns = estimate(cell).columns()
    assert columns["memory_estimate_weights_bytes"] == params * weights_per_param
    assert columns["memory_estimate_optimizer_bytes"] == params * optimizer_per_param


def test_kv_cache_is_bytes_per_token_times_slots_and_batch():
    spec = _spec("cpu", axes={"workload": ["decode"], "ffn": ["dense"], "attention": ["mha", "mla"], "precision": ["fp32"]})
    for cell in spec_lib.expand(spec, "cpu"):
        from dsbench.accounting import static_row

        row = static_row(cell)
        assert row["memory_estimate_kv_cache_bytes"] == row["kv_cache_bytes_per_token"] * 16 * (512 + 2)


def test_an_expert_parallel_rank_holds_its_share_of_the_experts():
    raw = {"name": "ep", "device": "cpu", "model": {"size": "small"},
           "axes": {"workload": ["train"], "ffn": ["moe"], "attention": ["mha"], "precision": ["fp32"], "balance": ["bias"],
                    "parallel.ep": [1, 2, 4]},
           "train": {"steps": 2, "batch_size": 4, "seq_len": 64}, "measure": {"warmup": 1}}
    by_ep = {c.ep: estimate(c).weights_bytes for c in spec_lib.expand(spec_lib.parse_spec(raw), "cpu")}
    assert by_ep[1] > by_ep[2] > by_ep[4]
    cfg = next(iter(spec_lib.expand(spec_lib.parse_spec(raw), "cpu"))).model
    lay = cfg.ffn.layout()
    one_expert_bytes = 3 * cfg.d_model * lay.expert_d_ff * 4
    assert by_ep[1] - by_ep[2] == cfg.n_layers * one_expert_bytes * lay.n_routed // 2


# --- refusal, --force ---


XL_TRAIN = ("--size", "xl", "--workload", "train", "--device", "cpu", "--batch-size", "1", "--seq-len", "128")
GIB = 2**30


@pytest.fixture
def host_of_24_gib(monkeypatch):
    """The issue's machine, whatever this one has."""
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: (24 * GIB, "a 24 GiB test host"))


def test_xl_train_is_refused_in_one_line_before_any_folder(host_of_24_gib, tmp_path):
    out = tmp_path / "xl"
    done = dsbench_in_process("run", "cell", *XL_TRAIN, "--out", str(out))
    assert_usage_error(done, "memory:", "train/dense/mha/fp32 b1×t128", "GiB", "24 GiB is available", "--force")
    assert not out.exists()


def test_dry_run_prints_the_estimate_and_refuses(host_of_24_gib, tmp_path):
    spec = tmp_path / "xl.toml"
    spec.write_text('name = "xl"\ndevice = "cpu"\n[model]\nsize = "xl"\n[axes]\nworkload = ["train"]\nffn = ["dense"]\n'
                    'attention = ["mha"]\nprecision = ["fp32"]\n[train]\nsteps = 4\nbatch_size = 1\nseq_len = 128\n'
                    '[measure]\nwarmup = 1\n')
    done = dsbench_in_process("run", "sweep", str(spec), "--dry-run")
    assert_usage_error(done, "memory:", "--force")
    assert "est. MiB" in done.stdout
    forced = dsbench_in_process("run", "sweep", str(spec), "--dry-run", "--force")
    assert forced.returncode == 0 and "est. MiB" in forced.stdout, forced.stderr


@pytest.mark.parametrize("available_gib, refused", [(1e-3, True), (1e3, False)])
def test_the_limit_is_the_estimate_itself(monkeypatch, available_gib, refused):
    """No hidden margin: refused exactly when the estimate exceeds what is available."""
    spec = _spec("cpu", axes={"workload": ["train"], "ffn": ["dense"], "attention": ["mha"], "precision": ["fp32"]})
    cells = spec_lib.expand(spec, "cpu")
    need = estimate(cells[0]).process_bytes
    for limit, fails in ((need - 1, True), (need, False), (int(available_gib * GIB), refused)):
        try:
            memory_estimate.check_fits(cells, "cpu", (limit, "test"))
            assert not fails
        except memory_estimate.UsageError:
            assert fails


@pytest.mark.slow
def test_force_runs_a_refused_cell(monkeypatch, tmp_path):
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: (1 << 16, "a 64 KiB test host"))
    flags = ("--size", "debug", "--workload", "prefill", "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
             "--warmup", "1", "--repeats", "2")
    assert_usage_error(dsbench_in_process("run", "cell", *flags, "--out", str(tmp_path / "no")), "64 KiB test host")
    done = dsbench_in_process("run", "cell", *flags, "--out", str(tmp_path / "yes"), "--force")
    assert done.returncode == 0, done.stderr
    row = load_results(tmp_path / "yes").cells.iloc[0]
    assert row["status"] == "ok" and row["memory_estimate_bytes"] > 1 << 16 and row["peak_mem_bytes"] > 0


def test_a_slurm_job_is_held_to_its_mem_gb_and_a_gpu_elsewhere_is_unknown():
    from dsbench.executors import ExecutorSettings

    assert memory_estimate.available_for(ExecutorSettings(kind="slurm", mem_gb=8), "cpu") == (8e9, "[executor] mem_gb")
    assert memory_estimate.available_for(ExecutorSettings(kind="slurm", mem_gb=8), "cuda")[0] is None
    assert memory_estimate.available_for(ExecutorSettings(kind="slurm"), "cpu")[0] is None


def test_this_machine_reports_some_memory():
    limit, source = memory_estimate.available_bytes("cpu")
    assert limit is not None and limit > 0 and source
    if not torch.cuda.is_available():
        assert memory_estimate.available_bytes("cuda")[0] is None or memory_estimate.available_bytes("cuda")[0] > 0
