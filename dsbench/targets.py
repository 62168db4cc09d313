"""GPUs a sweep can be previewed against on any machine: `dsbench run sweep --dry-run --target NAME`
lists a CUDA sweep's cells with their memory estimate against the target's memory and the
fastest step its datasheet allows, before a cluster is asked for it.

A target names a row of hardware.KNOWN_PEAKS (dense bf16/fp8 tensor-core FLOP/s and HBM bytes/s,
each from its vendor's datasheet, cited there) and the memory the same datasheet prints. The
datasheets' "GB" is taken as 10⁹ bytes: CUDA reports a little more (an H200's total is 150.1e9
bytes, results/gpu-check-h200), and the CUDA context and the allocator take some of it, so a
cell refused here is refused on less than the card has, never on more.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsbench.errors import UsageError
from dsbench.hardware import KNOWN_PEAKS


@dataclass(frozen=True)
class Target:
    name: str  # what --target takes
    gpu: str  # its KNOWN_PEAKS row
    memory_gb: float  # the datasheet's capacity, 10⁹ bytes

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def peak_flops_per_s(self, peak_key: str) -> float | None:
        """Dense datasheet FLOP/s for a precision's peak_key; None: no such tensor cores (fp8 on an A100)."""
        return KNOWN_PEAKS[self.gpu].get(peak_key)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return KNOWN_PEAKS[self.gpu]["hbm_bytes_per_s"]

    def describe(self) -> str:
        """'h100-80gb (H100 SXM: 80 GB, bf16 989 TFLOP/s, fp8 1979 TFLOP/s, 3.35 TB/s)'."""
        fp8 = self.peak_flops_per_s("fp8")
        fp8_text = f"fp8 {fp8 / 1e12:,.0f} TFLOP/s" if fp8 else "no fp8 tensor cores"
        return (f"{self.name} ({self.gpu}: {self.memory_gb:g} GB, bf16 {self.peak_flops_per_s('bf16') / 1e12:,.0f} TFLOP/s, "
                f"{fp8_text}, {self.bandwidth_bytes_per_s / 1e12:.2f} TB/s)")


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("h100-80gb", "H100 SXM", 80),  # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 80 GB HBM3
    Target("h100-nvl-94gb", "H100 NVL", 94),  # same datasheet, H100 NVL: 94 GB HBM3
    Target("h100-pcie-80gb", "H100 PCIe", 80),  # NVIDIA H100 PCIe product brief: 80 GB HBM2e
    Target("h200-141gb", "H200", 141),  # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: 141 GB HBM3e
    Target("h200-nvl-141gb", "H200 NVL", 141),  # same datasheet, H200 NVL: 141 GB HBM3e
    Target("h800-80gb", "H800 SXM", 80),  # NVIDIA H800 datasheet: 80 GB HBM3
    Target("a100-80gb", "A100 SXM 80GB", 80),  # NVIDIA A100 Tensor Core GPU datasheet: 80 GB HBM2e
    Target("a100-40gb", "A100 SXM 40GB", 40),  # same datasheet: 40 GB HBM2
    Target("l40s-48gb", "L40S", 48),  # NVIDIA L40S GPU datasheet: 48 GB GDDR6
    Target("rtx4090-24gb", "RTX 4090", 24),  # NVIDIA GeForce RTX 4090 specifications: 24 GB GDDR6X
    Target("b200-180gb", "B200", 180),  # NVIDIA HGX B200 datasheet: 1,440 GB over 8 GPUs
)}
ASSUMED = "h100-80gb"  # a CUDA preview with no --target on a machine without a GPU


def target_of(name: str) -> Target:
    if name not in TARGETS:
        raise UsageError(f"--target: {name!r} is not a known GPU; allowed: {', '.join(TARGETS)}")
    return TARGETS[name]


@dataclass(frozen=True)
class Preview:
    """Where a --dry-run's cells are expanded and what their memory is checked against."""

    device: str  # cpu | cuda
    target: Target | None  # None: this machine's own memory
    note: str | None = None  # one line when the target was assumed

    @property
    def assumed(self) -> bool:
        """An assumed target's misfits are listed, not refused: the user named no GPU."""
        return self.note is not None


def preview_device(requested: str, target: str | None, cuda_here: bool) -> Preview:
    """A dry run never needs the device: 'cuda' (or --target) on a machine without one previews
    the cells as they would run on the target GPU; a real run still refuses (runner.resolve_device)."""
    chosen = target_of(target) if target is not None else None
    if chosen is not None:
        if requested == "cpu":
            raise UsageError(f"--target: {target!r} is a GPU and this spec's device is cpu; pass --device cuda to preview it there")
        return Preview("cuda", chosen)
    if requested == "cuda" and not cuda_here:
        return Preview("cuda", TARGETS[ASSUMED], f"no GPU here: previewing on --target {ASSUMED} (assumed; "
                                                 f"allowed: {', '.join(TARGETS)})")
    return Preview("cuda" if requested == "cuda" or (requested == "auto" and cuda_here) else "cpu", None)


# --- the cells on a target ---


def memory_need(cell) -> int:
    """What the cell's process needs on each of its GPUs (memory_estimate; ranks each have their own)."""
    from dsbench.memory_estimate import estimate

    return estimate(cell).process_bytes


def light_ms(cell, target: Target) -> tuple[float | None, str]:
    """The fastest step the target's datasheet allows (roofline.light_step, over the cell's ranks)
    and its bound; None and why where the target has no tensor cores for the cell's arithmetic."""
    from dsbench.roofline import light_step
    from dsbench.variants.precision import precision_of

    precision = precision_of(cell.model)
    peak = target.peak_flops_per_s(precision.peak_key)
    if not peak:
        return None, f"{precision.name} emulated on {target.name}"
    seconds, bound, _ = light_step(cell, peak * cell.ep, target.bandwidth_bytes_per_s * cell.ep)
    return 1e3 * seconds, bound


def too_big(cells, target: Target) -> list:
    """The cells whose estimate exceeds the target's memory, in order."""
    return [c for c in cells if memory_need(c) > target.memory_bytes]


def check_fits(cells, target: Target, force: bool = False) -> None:
    """Refuse (one line) a preview in which some cell cannot fit on the target, naming them all."""
    big = too_big(cells, target)
    if force or not big:
        return
    named = "; ".join(f"{c.cell_id} {c.label()} needs {memory_need(c) / 1e9:,.1f} GB" for c in big[:3])
    more = f"; … {len(big) - 3} more" if len(big) > 3 else ""
    raise UsageError(f"memory: {len(big)} of {len(cells)} cells would not fit on {target.name} ({target.memory_gb:g} GB): "
                     f"{named}{more} (estimated); pass --force to preview them anyway, or choose a larger --target")
