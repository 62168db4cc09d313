"""Which implementation runs each op family (issue 27): one seam for every kernel choice.

A family is one operation with several implementations that compute the same numbers (to the
family's stated tolerance): the plain-PyTorch `reference` (the truth for tests), our Triton
kernel, torch's own fast paths, a library's where installed. A cell's `kernels.<family>` is
`auto` (the default) or the name of one implementation.

`auto` picks, once per process and shape key, the fastest implementation that runs here and
agrees with the reference: each candidate that runs on the call's inputs is called once
untimed (warm-up, compilation), its output is checked against the reference's (RMS-relative
error ≤ the family's tolerance), then the survivors are timed in `reps` alternating rounds
(the median counts). The step in which that happens is no sample (profiling.note_untimed_work).
Under torch.compile nothing can be timed inside the trace: there `auto` takes the first
candidate of the family's `compile_order` that runs. Under a TorchDispatchMode (FlopCounterMode,
FakeTensorMode) the reference runs and nothing is measured. On CUDA the measurement synchronises,
once per key, outside the timed steps.

What ran, and why, is recorded per family: `kernel_<family>` (the implementation, or "mixed"
where calls of one cell took several) and `kernel_<family>_why` (pinned, or the measurement:
each candidate's median µs and error, and why the others did not run).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

AUTO = "auto"
_COMPILED = "_compiled_pick_"  # + a family's name: the implementation its compiled calls took


class KernelUnavailable(ValueError):
    """A pinned implementation that cannot run on this call's inputs (one line, names the key)."""


@dataclass(frozen=True)
class Implementation:
    name: str
    fn: Callable  # same arguments as the family's reference, returns the same tensor
    # Why it cannot run on these arguments (device, dtype, shape, a missing library), or None.
    # Must not synchronise a GPU; shapes, dtypes and device properties only.
    runs_on: Callable[..., str | None] = lambda *args, **kwargs: None
    # Why it cannot run on a device at all ("cpu", "cuda"), for --dry-run; None: it may.
    device_ok: Callable[[str], str | None] = lambda device: None
    note: str = ""  # one line: what it is (the docs' and dry-run's table)


@dataclass
class Family:
    name: str
    reference: str  # the implementation every other is checked against
    implementations: dict[str, Implementation]
    key: Callable[..., tuple]  # what the pick depends on (shapes, dtype, device); no device sync
    # RMS-relative error vs the reference allowed for a candidate (a number, or a function of the
    # call's arguments, e.g. of their dtype), justified in a comment where the family registers.
    tolerance: float | Callable[..., float]
    compile_order: tuple[str, ...] = ()  # under torch.compile: the first of these that runs
    # (fn, needs_grad, *args, **kwargs) → None: one timed call (default: call fn; forward_backward
    # for a family whose calls run in training, so auto times what the step will run)
    trial: Callable | None = None
    output: Callable = lambda out: out  # the tensor to compare, from what fn returns
    description: str = ""

    def candidates(self, *args, **kwargs) -> tuple[list[str], dict[str, str]]:
        """(names that run on these arguments, {name: why not} for the rest)."""
        runs, why_not = [], {}
        for name, impl in self.implementations.items():
            reason = impl.runs_on(*args, **kwargs)
            if reason is None:
                runs.append(name)
            else:
                why_not[name] = reason
        return runs, why_not


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.reference not in family.implementations:
        raise ValueError(f"kernel family {family.name}: reference {family.reference!r} is not one of its implementations")
    FAMILIES[family.name] = family
    return family


def family(name: str) -> Family:
    if name not in FAMILIES:
        _load_builtin_families(name)
    return FAMILIES[name]


def families() -> tuple[str, ...]:
    _load_builtin_families()
    return tuple(FAMILIES)


def _load_builtin_families(name: str | None = None) -> None:
    """Each family registers in the file of its kernels; importing it is what registers. One
    family's file only where a name is given: fp8_gemm's imports triton, which a cell that never
    runs FP8 should not pay for (~1 s and ~85 MB at its start)."""
    from . import families

    families.load(name)


def rms_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 where both are 0)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom else (0.0 if diff == 0 else math.inf)


@dataclass
class Decision:
    name: str
    why: str


@dataclass
class Chooser:
    """The implementation of every family for one process (one cell): pins, and auto's picks."""

    pins: dict[str, str] = field(default_factory=dict)  # family → implementation name (absent: auto)
    reps: int = 3
    clock: Callable[[], float] = time.perf_counter
    decisions: dict[tuple, Decision] = field(default_factory=dict)  # (family, key) → what was chosen
    ran: dict[str, set] = field(default_factory=dict)  # family → implementations that ran
    # Called after a decision's trials (the worker: restart the peak-memory counters, so a cell's
    # peak is what its own steps hold; the steps after this one rerun the same work).
    after_trials: Callable[[], None] | None = None

    def run(self, family_name: str | Family, *args, **kwargs):
        """Call the family's chosen implementation on these arguments."""
        return self.pick(family_name, *args, **kwargs).fn(*args, **kwargs)

    def pick(self, family_name: str | Family, *args, **kwargs) -> Implementation:
        """The implementation these arguments take (recorded as having run), without calling it:
        for a caller that keeps its own record of what ran (the MoE layer's moe_dispatch column).
        A Family object, rather than its name, loads no other family (importing one may import
        triton), and traces under torch.compile without an import."""
        fam = family_name if isinstance(family_name, Family) else family(family_name)
        name = self.choose(fam, *args, **kwargs)
        if torch.compiler.is_compiling():
            # Written, never read: reading `ran` in the trace would make its contents a guard, and
            # the first call's record would recompile the second.
            setattr(self, _COMPILED + fam.name, name)
        else:
            self.ran.setdefault(fam.name, set()).add(name)
        return fam.implementations[name]

    def all_ran(self) -> dict[str, set]:
        """`ran`, with what compiled calls took."""
        ran = {f: set(names) for f, names in self.ran.items()}
        for attr, name in vars(self).items():
            if attr.startswith(_COMPILED):
                ran.setdefault(attr[len(_COMPILED):], set()).add(name)
        return ran

    def choose(self, fam: Family, *args, **kwargs) -> str:
        pin = self.pins.get(fam.name, AUTO)
        if pin != AUTO:
            reason = fam.implementations[pin].runs_on(*args, **kwargs)
            if reason is not None:
                raise KernelUnavailable(f"kernels.{fam.name}: {pin!r} does not run on these inputs: {reason}")
            self.decisions.setdefault((fam.name, "pinned"), Decision(pin, "pinned"))
            return pin
        if torch.compiler.is_compiling():
            return self._compile_pick(fam, *args, **kwargs)
        if is_in_torch_dispatch_mode():  # FlopCounterMode, FakeTensorMode: nothing to time, and it would see every candidate
            return fam.reference
        key = (fam.name, fam.key(*args, **kwargs))
        if key in self.decisions:
            return self.decisions[key].name
        decision = self._measure(fam, *args, **kwargs)
        _forget_trial_memory()
        if self.after_trials is not None:
            self.after_trials()
        if decision is None:  # no finite reference output to check against: decide on a later call
            return fam.reference
        self.decisions[key] = decision
        return decision.name

    def _compile_pick(self, fam: Family, *args, **kwargs) -> str:
        """The first of compile_order that runs; only those are asked (a runs_on that reads a
        torch flag would break the graph)."""
        for name in fam.compile_order:
            if fam.implementations[name].runs_on(*args, **kwargs) is None:
                return name
        return fam.reference

    def _measure(self, fam: Family, *args, **kwargs) -> Decision | None:
        from dsbench.variants import profiling  # the step that measures is no sample

        runs, why_not = fam.candidates(*args, **kwargs)
        if len(runs) <= 1:
            name = runs[0] if runs else fam.reference
            return Decision(name, "only one runs here" + _why_not(why_not))
        profiling.note_untimed_work()
        tolerance = fam.tolerance(*args, **kwargs) if callable(fam.tolerance) else fam.tolerance
        needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        with torch.no_grad():
            ref = fam.output(fam.implementations[fam.reference].fn(*args, **kwargs))
            if not torch.isfinite(ref).all():
                return None
            errors, rejected = {}, dict(why_not)
            for name in runs:
                try:  # the first call also warms it up (and compiles a Triton kernel)
                    out = ref if name == fam.reference else fam.output(fam.implementations[name].fn(*args, **kwargs))
                except RuntimeError as e:  # e.g. an SDPA backend: "No available kernel"
                    rejected[name] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    continue
                errors[name] = rms_relative_error(out, ref)
                if not errors[name] <= tolerance:
                    rejected[name] = f"error {errors[name]:.1e} > {tolerance:.0e} vs {fam.reference}"
        correct = [n for n in runs if n not in rejected]
        times = self._time(fam, correct, needs_grad, *args, **kwargs)
        ranked = sorted(correct, key=lambda n: (times[n], n))
        measured = ", ".join(f"{n} {1e6 * times[n]:.4g}" for n in ranked)
        worst = max(errors[n] for n in ranked)
        return Decision(ranked[0], f"auto: {measured} µs (median of {self.reps}; max error {worst:.1e} vs {fam.reference})"
                        + _why_not(rejected))

    def _time(self, fam: Family, names: list[str], needs_grad: bool, *args, **kwargs) -> dict[str, float]:
        samples: dict[str, list[float]] = {n: [] for n in names}
        trial = fam.trial or forward_only
        device = _device_of(args)
        for i in range(self.reps):
            for name in names if i % 2 else names[::-1]:  # alternate the order against drift
                _sync(device)
                start = self.clock()
                trial(fam.implementations[name].fn, needs_grad, *args, **kwargs)
                _sync(device)
                samples[name].append(self.clock() - start)
        return {n: sorted(v)[len(v) // 2] for n, v in samples.items()}

    def columns(self) -> dict:
        """kernel_<family> and kernel_<family>_why for every family a call went through."""
        row = {}
        for fam_name, names in sorted(self.all_ran().items()):
            row[f"kernel_{fam_name}"] = next(iter(names)) if len(names) == 1 else "mixed"
            whys = [f"{d.name}: {d.why}" if len(names) > 1 else d.why
                    for (f, _), d in self.decisions.items() if f == fam_name]
            row[f"kernel_{fam_name}_why"] = "; ".join(dict.fromkeys(whys)) or "under torch.compile: " + self._order(fam_name)
        return row

    def _order(self, fam_name: str) -> str:
        fam = family(fam_name)
        return "the first of " + ", ".join((*fam.compile_order, fam.reference)) + " that runs"


def forward_only(fn: Callable, needs_grad: bool, *args, **kwargs) -> None:
    with torch.no_grad():
        fn(*args, **kwargs)


def forward_backward(fn: Callable, needs_grad: bool, *args, **kwargs) -> None:
    """Forward, and where the call is part of training, backward with ones (on detached copies)."""
    if not needs_grad:
        return forward_only(fn, needs_grad, *args, **kwargs)
    with torch.enable_grad():
        inputs = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*inputs, **kwargs)
        out.backward(torch.ones_like(out))


def triton_device_ok(device: str) -> str | None:
    """Triton kernels compile for GPUs; TRITON_INTERPRET=1 runs them on a CPU, for tests only."""
    import os

    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "a Triton kernel needs a GPU (TRITON_INTERPRET=1 runs it on a CPU, for tests)"


def _forget_trial_memory() -> None:
    """The trials' memory is no sample either: hand freed heap back to the OS (glibc keeps it,
    and it would stay in RSS until a Chooser.after_trials reset of the peak counters)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def under_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors records an autograd graph (for runs_on and keys)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _why_not(why_not: dict[str, str]) -> str:
    """'; not run: a, b (why), c (why)': implementations sharing a reason are named together."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in why_not.items():
        by_reason.setdefault(reason, []).append(name)
    return "; not run: " + ", ".join(f"{'/'.join(n)} ({r})" for r, n in by_reason.items()) if by_reason else ""


def _device_of(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


_active = Chooser()


def active() -> Chooser:
    return _active


@contextlib.contextmanager
def use(chooser: Chooser) -> Iterator[Chooser]:
    """Make `chooser` the one every family call goes through (the worker: one per cell)."""
    global _active
    before, _active = _active, chooser
    try:
        yield chooser
    finally:
        _active = before


def run(family_name: str, *args, **kwargs):
    """Call family `family_name` through the active chooser."""
    return _active.run(family_name, *args, **kwargs)


def check_pins(pins: dict, device: str | None) -> str | None:
    """The first pin that names no family or implementation, or one that cannot run on this
    device at all (device None: names only), as one line naming the key; else None."""
    _load_builtin_families()
    for fam_name, impl in pins.items():
        if fam_name not in FAMILIES:
            return f"kernels.{fam_name}: unknown op family; allowed: {', '.join(sorted(FAMILIES))}"
        fam = FAMILIES[fam_name]
        allowed = (AUTO, *fam.implementations)
        if impl not in allowed:
            return f"kernels.{fam_name}: {impl!r} is not an implementation; allowed: {', '.join(allowed)}"
        if impl != AUTO and device is not None and (reason := fam.implementations[impl].device_ok(device.split(":")[0])):
            return f"kernels.{fam_name}: {impl!r} cannot run on {device}: {reason}"
    return None


def preview(fam_name: str, pin: str, device: str) -> str:
    """What --dry-run says a family will use on a device: the pin, or auto's candidates."""
    fam = family(fam_name)
    if pin != AUTO:
        return pin
    dev = device.split(":")[0]
    names = [n for n, impl in fam.implementations.items() if impl.device_ok(dev) is None]
    return names[0] if len(names) == 1 else f"auto({'|'.join(names)})"
