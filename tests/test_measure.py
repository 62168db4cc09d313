import json
import time

import pytest
import torch

from dsbench.measure import (
    NvmlSampler,
    StepTimer,
    current_rss_bytes,
    peak_memory,
    reset_peak_memory,
    summarize,
    sync,
)

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# -- summarize ---------------------------------------------------------------------------------


def test_summarize_known_values():
    # 1..11: linear percentiles sit on ranks 1, 5, 9 (0-based) exactly.
    s = summarize([float(v) for v in range(11, 0, -1)])
    assert s == {"median": 6.0, "p10": 2.0, "p90": 10.0, "mean": 6.0,
                 "min": 1.0, "max": 11.0, "n": 11}


def test_summarize_interpolates_linearly():
    # [0, 10, 20, 30]: rank 0.3 -> 3.0, rank 1.5 -> 15.0, rank 2.7 -> 27.0.
    s = summarize([30.0, 0.0, 20.0, 10.0])
    assert s["p10"] == pytest.approx(3.0)
    assert s["median"] == pytest.approx(15.0)
    assert s["p90"] == pytest.approx(27.0)
    assert s["n"] == 4


def test_summarize_keeps_outliers():
    s = summarize([1.0, 1.0, 1.0, 1000.0])
    assert s["max"] == 1000.0 and s["n"] == 4


def test_summarize_single_and_empty():
    assert summarize([2.5])["p10"] == 2.5
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_is_json_plain():
    json.dumps(summarize([0.1, 0.2, 0.3]))


# -- StepTimer -----------------------------------------------------------------------------------


def test_step_timer_cpu_measures_sleep():
    timer = StepTimer(CPU)
    with timer.step(record=False):  # warm-up leaves no sample
        time.sleep(0.001)
    for _ in range(3):
        with timer.step():
            time.sleep(0.02)
    samples = timer.samples_s()
    assert len(samples) == 3 == len(timer)
    assert all(0.019 <= s < 0.5 for s in samples)


def test_step_timer_reset_drops_samples():
    timer = StepTimer("cpu")
    with timer.step():
        pass
    timer.reset()
    assert timer.samples_s() == []


def test_step_timer_failed_step_not_recorded():
    timer = StepTimer(CPU)
    with pytest.raises(RuntimeError):
        with timer.step():
            raise RuntimeError("boom")
    assert timer.samples_s() == []


def test_sync_cpu_is_noop():
    sync("cpu")


@pytest.mark.gpu
@needs_cuda
def test_step_timer_cuda_events():
    dev = torch.device("cuda")
    a = torch.randn(2048, 2048, device=dev)
    timer = StepTimer(dev)
    for _ in range(5):
        with timer.step():
            a @ a
    samples = timer.samples_s()
    assert len(samples) == 5 and all(0 < s < 1.0 for s in samples)


# -- memory --------------------------------------------------------------------------------------


def test_peak_memory_keys_cpu():
    reset_peak_memory(CPU)
    m = peak_memory(CPU)
    assert set(m) == {"cuda_max_allocated_bytes", "cuda_max_reserved_bytes",
                      "peak_rss_bytes", "peak_mem_bytes"}
    assert m["cuda_max_allocated_bytes"] is None and m["cuda_max_reserved_bytes"] is None
    assert m["peak_rss_bytes"] > 0 and m["peak_mem_bytes"] == m["peak_rss_bytes"]


def test_rss_grows_after_big_allocation():
    before = current_rss_bytes()
    if before is None:
        pytest.skip("no /proc/self/statm")
    big = torch.ones(64 << 20)  # 256 MiB of float32, every page touched
    after = current_rss_bytes()
    peak = peak_memory(CPU)["peak_rss_bytes"]
    assert after - before >= 200 << 20
    assert peak >= after
    del big


@pytest.mark.gpu
@needs_cuda
def test_peak_memory_cuda():
    dev = torch.device("cuda")
    reset_peak_memory(dev)
    x = torch.empty(64 << 20, device=dev)
    m = peak_memory(dev)
    assert m["cuda_max_allocated_bytes"] >= x.nbytes
    assert m["peak_mem_bytes"] == m["cuda_max_allocated_bytes"]


# -- NVML ----------------------------------------------------------------------------------------


def test_nvml_sampler_cpu_all_none():
    with NvmlSampler(CPU) as sampler:
        time.sleep(0.01)
    summary = sampler.summary()
    assert set(summary) == {"power_w_mean", "power_w_max", "energy_j", "energy_source",
                            "gpu_mem_used_bytes_max", "gpu_busy_fraction"}
    assert all(v is None for v in summary.values())


def test_nvml_sampler_summary_before_enter():
    assert all(v is None for v in NvmlSampler("cpu").summary().values())


def test_nvml_sampler_survives_nvml_failure(monkeypatch):
    # A CUDA device whose NVML init fails (as on a box without the driver) must not raise.
    import sys
    import types

    broken = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("no NVML")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    with NvmlSampler("cuda:0") as sampler:
        pass
    assert all(v is None for v in sampler.summary().values())


def test_nvml_power_integral_fallback():
    sampler = NvmlSampler(CPU)
    sampler._power_samples = [(0.0, 100.0), (1.0, 200.0), (2.0, 200.0)]
    s = sampler.summary()
    assert s["energy_j"] == pytest.approx(350.0)
    assert s["energy_source"] == "power_integral"
    assert s["power_w_max"] == 200.0


@pytest.mark.gpu
@needs_cuda
def test_nvml_sampler_cuda():
    pytest.importorskip("pynvml")
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev)
    with NvmlSampler(dev) as sampler:
        t_end = time.perf_counter() + 0.5
        while time.perf_counter() < t_end:
            a @ a
        sync(dev)
    s = sampler.summary()
    assert s["power_w_mean"] is None or s["power_w_mean"] > 0
    assert s["gpu_mem_used_bytes_max"] is None or s["gpu_mem_used_bytes_max"] > 0
    assert s["energy_source"] in ("nvml_counter", "power_integral", None)


def _fake_pynvml(energy_mj=None, fail_uuid=False):
    """A stand-in pynvml: 250 W, 1 GiB used, an energy counter rising 1 J per read if given."""
    import types

    fake = types.ModuleType("pynvml")
    fake.calls = {"init": 0, "shutdown": 0, "uuid": None, "index": None}
    counter = {"mj": energy_mj}

    def init():
        fake.calls["init"] += 1

    def shutdown():
        fake.calls["shutdown"] += 1

    def by_uuid(uuid):
        if fail_uuid:
            raise RuntimeError("unknown uuid")
        fake.calls["uuid"] = uuid
        return "handle"

    def by_index(index):
        fake.calls["index"] = index
        return "handle"

    def energy(handle):
        if counter["mj"] is None:
            raise RuntimeError("not supported")
        counter["mj"] += 1000
        return counter["mj"]

    fake.nvmlInit, fake.nvmlShutdown = init, shutdown
    fake.nvmlDeviceGetHandleByUUID, fake.nvmlDeviceGetHandleByIndex = by_uuid, by_index
    fake.nvmlDeviceGetPowerUsage = lambda handle: 250_000  # mW
    fake.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=1 << 30)
    fake.nvmlDeviceGetTotalEnergyConsumption = energy
    return fake


def _fake_cuda_props(monkeypatch):
    import types

    props = types.SimpleNamespace(uuid="0b42632a-bc5c-f731-724b-6936a19c4b24")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)


def test_nvml_sampler_counter_path(monkeypatch):
    import sys

    fake = _fake_pynvml(energy_mj=5_000_000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _fake_cuda_props(monkeypatch)
    with NvmlSampler("cuda:0", interval_s=0.01) as sampler:
        time.sleep(0.05)
    s = sampler.summary()
    assert fake.calls["uuid"] == "GPU-0b42632a-bc5c-f731-724b-6936a19c4b24"
    assert fake.calls["init"] == fake.calls["shutdown"] == 1
    assert s["power_w_mean"] == s["power_w_max"] == 250.0
    assert s["gpu_mem_used_bytes_max"] == 1 << 30
    assert s["energy_j"] == 1.0 and s["energy_source"] == "nvml_counter"


def test_nvml_sampler_integral_and_visible_devices(monkeypatch):
    import sys

    fake = _fake_pynvml(energy_mj=None, fail_uuid=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    _fake_cuda_props(monkeypatch)
    with NvmlSampler("cuda:1", interval_s=0.01) as sampler:
        time.sleep(0.05)
    s = sampler.summary()
    assert fake.calls["index"] == 5
    assert s["energy_source"] == "power_integral"
    assert s["energy_j"] == pytest.approx(250.0 * 0.05, rel=0.5)


def test_a_step_with_once_only_work_is_no_sample():
    """A part that announces once-only work (the MoE dispatch timing its two paths) costs its
    step the sample, not the median."""
    from dsbench.measure import StepTimer
    from dsbench.variants import profiling

    timer = StepTimer("cpu")
    for i in range(5):
        with timer.step():
            if i in (1, 3):
                profiling.note_untimed_work()
    with timer.step(record=False):
        profiling.note_untimed_work()
    assert len(timer.samples_s()) == 3 and timer.dropped == 2
