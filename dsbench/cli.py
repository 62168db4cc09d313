"""The `dsbench` command: a thin Typer layer over the library (spec, runner, results, hardware).

Exit codes: 0 success; 1 a cell failed (the sweep still recorded every cell); 2 bad input
(one line on stderr, nothing run); 130 interrupted by Ctrl-C, 143 by SIGTERM (finished cells kept,
consolidated; rerun with --resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

try:  # typer ≥ 0.2x carries its own click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort
except ImportError:  # older typer runs on click
    import click.exceptions

    from click.exceptions import Abort, ClickException
    NoArgsIsHelpError = getattr(click.exceptions, "NoArgsIsHelpError", ())  # () catches nothing

from dsbench import spec as spec_lib
from dsbench import targets
from dsbench.errors import UsageError, UserError
from dsbench.schema import AXES
from dsbench.terminal import stderr_console, stdout_console, styled
from dsbench.variants import registry
from dsbench.workloads import WORKLOADS, CellFlags

class OneLineErrors(TyperGroup):
    """Typer's own usage errors (an unknown flag, a value of the wrong type, a missing argument)
    as every other bad input: one line naming the flag, exit 2, instead of a boxed panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:  # a bare group: its help, as before
            e.show()
            sys.exit(e.exit_code)
        except ClickException as e:
            where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) is not None else ""
            hint = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
            err_console.print(styled(("error:", "red"), f" {where}{' '.join(e.format_message().split())}{hint}"), highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except Abort:
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        """A KeyboardInterrupt nothing below handled (Ctrl-C while a spec is checked, or a plug-in
        raising it): one line saying where, then exit 130 (Typer's own exit, silent before)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            if not getattr(e, "dsbench_said", False):  # a nested group (run) says it once
                e.dsbench_said = True
                err_console.print(f"interrupted (KeyboardInterrupt) in {interrupted_at(e)}, during `{ctx.command_path} "
                                  f"{ctx.invoked_subcommand or ''}`; exit 130", highlight=False, soft_wrap=True)
            raise


def interrupted_at(e: BaseException) -> str:
    """'module.function (file:line)' of the innermost frame, and the dsbench frame that called it."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "an unknown place"
    here = lambda f: f"{f.name} ({Path(f.filename).name}:{f.lineno})"  # noqa: E731
    inner = frames[-1]
    ours = [f for f in frames[:-1] if "dsbench" in Path(f.filename).parts]
    caller = f", called from {here(ours[-1])}" if ours and ours[-1] is not inner and "dsbench" not in Path(inner.filename).parts else ""
    return here(inner) + caller


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False, help="Measure what each DeepSeek architecture choice buys.")
run_app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, help="Run a sweep of cells, or one cell.")
app.add_typer(run_app, name="run")
out_console = stdout_console()  # markup off: user text prints as text (dsbench/terminal.py)
err_console = stderr_console()


@contextlib.contextmanager
def user_errors():
    """Bad input: one line naming the field, value and what is allowed; exit 2; no traceback."""
    try:
        yield
    except UserError as e:
        err_console.print(styled(("error:", "red"), f" {e}"), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def load_sweep_spec(spec_file: Path | None, preset: str | None) -> tuple[spec_lib.SweepSpec, str]:
    if spec_file and preset:
        raise UsageError("--preset: give a SPEC file or --preset NAME, not both")
    if spec_file:
        return spec_lib.load_spec_file(spec_file), str(spec_file)
    name = preset or "smoke"
    return spec_lib.load_preset(name), f"preset:{name}"


@run_app.command("sweep")
def run_sweep_cmd(
    spec_file: Annotated[Optional[Path], typer.Argument(metavar="[SPEC]", help="A sweep spec (TOML).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="A shipped preset (see `dsbench presets`); default smoke.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results folder; default results/<name>-<time>.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out, skipping recorded cells.")] = False,
    rerun_failed: Annotated[bool, typer.Option(help="With --resume: run failed cells again.")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda; overrides the spec.")] = None,
    data: Annotated[Optional[str], typer.Option(help="'synthetic', a uint16 token file, a .txt file or a folder of .txt files.")] = None,
    dry_run: Annotated[bool, typer.Option(help="List the cells and their accounting; run nothing.")] = False,
    profile: Annotated[bool, typer.Option(help="Also profile each cell after measuring it (see `dsbench profile`); the report links the profiles.")] = False,
    profile_steps: Annotated[int, typer.Option(help="With --profile: steps to profile (≥ 1).")] = 3,
    executor: Annotated[Optional[str], typer.Option(help="local (one cell at a time here; default) | slurm (submitit jobs); overrides [executor] kind.")] = None,
    partition: Annotated[Optional[str], typer.Option(help="Slurm partition ([executor] partition).")] = None,
    account: Annotated[Optional[str], typer.Option(help="Slurm account ([executor] account).")] = None,
    time_min: Annotated[Optional[int], typer.Option(help="Slurm time limit per cell, minutes; default measure.timeout_s + 5.")] = None,
    gpus_per_cell: Annotated[Optional[int], typer.Option(help="GPUs per cell's job; default 1 on cuda, 0 on cpu.")] = None,
    cpus_per_cell: Annotated[Optional[int], typer.Option(help="CPUs per cell's job.")] = None,
    mem_gb: Annotated[Optional[float], typer.Option(help="Memory per cell's job, GB.")] = None,
    array_parallelism: Annotated[Optional[int], typer.Option(help="Jobs in flight at once; default 256 (1 on submitit's local backend).")] = None,
    sbatch: Annotated[Optional[list[str]], typer.Option(help="An extra #SBATCH parameter KEY=VALUE (repeatable), added to [executor] sbatch.")] = None,
    force: Annotated[bool, typer.Option(help="Run cells whose memory estimate exceeds the memory available (refused otherwise).")] = False,
    target: Annotated[Optional[str], typer.Option(help="With --dry-run: the GPU to preview on, on any machine (h100-80gb, h200-141gb, a100-80gb, …; `--target x` lists them).")] = None,
) -> None:
    """Run every cell of a sweep, each in a fresh process; write results tables."""
    from dsbench import runner

    with user_errors():
        spec, source = load_sweep_spec(spec_file, preset)
        spec = apply_overrides(spec, device=device, data=data)
        spec = apply_executor_flags(spec, kind=executor, partition=partition, account=account, time_min=time_min,
                                    gpus_per_cell=gpus_per_cell, cpus_per_cell=cpus_per_cell, mem_gb=mem_gb,
                                    array_parallelism=array_parallelism, sbatch=sbatch)
        if dry_run:
            plan, cells = runner.preview(spec, target)
            if plan.note:
                err_console.print(styled(("note:", "yellow"), f" {plan.note}"), highlight=False, soft_wrap=True)
            where = f" on {plan.target.describe()}" if plan.target else ""
            out_console.print(cells_table(cells, title=f"{spec.name}: {len(cells)} cells{where}", target=plan.target))
            runner.check_preview_memory(spec, plan, cells, force)  # the table first: it shows every cell's estimate
            if plan.target:
                big = len(targets.too_big(cells, plan.target))  # assumed, or --force: listed, not refused
                fit = f"all {len(cells)} cells fit" if not big else f"{big} of {len(cells)} cells would not fit (marked NO)"
                out_console.print(f"{fit} on {plan.target.name} ({plan.target.memory_gb:g} GB)", highlight=False)
            return
        if target is not None:
            raise UsageError("--target: only with --dry-run (a run checks the memory of the GPU it runs on)")
        runner.check_data(spec)
        options = profile_options(profile_steps) if profile else None
        outcome = runner.run_sweep(spec, out=out, resume=resume, rerun_failed=rerun_failed, console=err_console,
                                   spec_source=source, profile=options, force=force)
    finish(outcome)


@run_app.command("cell")
def run_cell_cmd(
    workload: Annotated[str, typer.Option(help="A workload (axes.workload; `dsbench workloads` lists them).")] = spec_lib.default_axes()["workload"][0],
    ffn: Annotated[str, typer.Option(help="FFN variant (axes.ffn).")] = spec_lib.default_axes()["ffn"][0],
    attention: Annotated[str, typer.Option(help="Attention variant (axes.attention).")] = spec_lib.default_axes()["attention"][0],
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | … (axes.precision).")] = spec_lib.default_axes()["precision"][0],
    balance: Annotated[str, typer.Option(help="Balancing for routed FFNs (axes.balance).")] = spec_lib.default_axes()["balance"][0],
    size: Annotated[str, typer.Option(help="Named model size (model.size).")] = "debug",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per row (train, prefill).")] = 128,
    context_len: Annotated[int, typer.Option(help="Context tokens before generation (decode).")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated (decode).")] = 32,
    steps: Annotated[int, typer.Option(help="Training steps (train; speculative: before decoding).")] = 30,
    mtp: Annotated[int, typer.Option(help="Multi-token-prediction modules D (model.mtp; speculative needs ≥ 1).")] = 0,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps.")] = 3,
    repeats: Annotated[int, typer.Option(help="Timed repeats (prefill, decode).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for weights and data.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    data: Annotated[str, typer.Option(help="Data source, as for `run sweep`.")] = "synthetic",
    out: Annotated[Optional[Path], typer.Option(help="Results folder; default results/cell-<time>.")] = None,
    force: Annotated[bool, typer.Option(help="Run cells whose memory estimate exceeds the memory available (refused otherwise).")] = False,
) -> None:
    """Run one configuration given by flags (the same isolation and results as a sweep)."""
    from dsbench import runner

    with user_errors():
        spec = cell_spec(workload, ffn, attention, precision, balance, size, batch_size, seq_len, context_len, new_tokens,
                         steps, mtp, warmup, repeats, seed, device, data)
        runner.check_data(spec)
        outcome = runner.run_sweep(spec, out=out, console=err_console, spec_source="dsbench run cell", force=force)
    finish(outcome)


def cell_spec(workload, ffn, attention, precision, balance, size, batch_size, seq_len, context_len, new_tokens,
              steps, mtp, warmup, repeats, seed, device, data) -> spec_lib.SweepSpec:
    """The one-cell spec that `run cell`'s flags describe."""
    flags = CellFlags(batch_size=batch_size, seq_len=seq_len, context_len=context_len, new_tokens=new_tokens, steps=steps)
    raw = {
        "name": "cell", "device": device, "seed": seed, "data": data, "model": {"size": size, **({"mtp": mtp} if mtp else {})},
        "axes": {"workload": workload, "ffn": ffn, "attention": attention, "precision": precision, "balance": balance},
        **{name: w.section_from_flags(flags) for name, w in WORKLOADS.items()},  # each workload's own keys
        "measure": {"warmup": warmup, "repeats": repeats},
    }
    return spec_lib.parse_spec(raw)


def profile_options(steps: int):
    from dsbench.profile import ProfileOptions  # on use: it loads torch.profiler and pandas

    if steps < 1:
        raise UsageError(f"--profile-steps: {steps} is not allowed; give a whole number ≥ 1")
    return ProfileOptions(steps=steps)


def with_cell_flags(command):
    """Give `command` run cell's flags too (Typer reads the signature), so they are declared once."""
    own = inspect.signature(command, eval_str=True).parameters
    flags = [p for name, p in inspect.signature(run_cell_cmd, eval_str=True).parameters.items() if name not in own]
    params = [p for p in own.values() if p.kind is not inspect.Parameter.VAR_KEYWORD] + flags
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@app.command("profile")
@with_cell_flags
def profile_cmd(
    spec_file: Annotated[Optional[Path], typer.Argument(metavar="[SPEC]", help="A sweep spec to take --cell from.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="A shipped preset to take --cell from.")] = None,
    results: Annotated[Optional[Path], typer.Option(help="A results folder to take --cell from (its recorded spec).")] = None,
    cell: Annotated[Optional[str], typer.Option(help="Cell id (or a unique prefix) in --results, SPEC or --preset; without it the flags below describe the cell.")] = None,
    profile_steps: Annotated[int, typer.Option(help="Steps to profile, ≥ 1 (decode: one round of new_tokens tokens).")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="Results folder; default results/profile-<time>.")] = None,
    force: Annotated[bool, typer.Option(help="Run cells whose memory estimate exceeds the memory available (refused otherwise).")] = False,
    **flags,
) -> None:
    """Profile one cell: time per part (forward, backward) with its roofline place, memory
    breakdown and a Chrome/Perfetto trace, in <out>/profiles/<cell_id>/."""
    from dsbench import profile as profile_lib
    from dsbench import runner

    with user_errors():
        spec, cell_id, source = profile_target(spec_file, preset, results, cell, flags)
        spec = dataclasses.replace(spec, name="profile", measure=dataclasses.replace(spec.measure, calibrate=True))
        runner.check_data(spec)
        outcome = runner.run_sweep(spec, out=out, console=err_console, spec_source=source, only={cell_id},
                                   profile=profile_options(profile_steps), force=force)
    folder = profile_lib.profile_folder(outcome.out, cell_id)
    if (folder / "profile.json").exists():
        print_profile(profile_lib.load_profile(folder), folder)
    finish(outcome)


def profile_target(spec_file, preset, results, cell_id, flags) -> tuple[spec_lib.SweepSpec, str, str]:
    """(spec, the cell's id, where it came from) for `dsbench profile`."""
    from dsbench import profile as profile_lib
    from dsbench import runner

    if results is not None:
        if spec_file or preset:
            raise UsageError("--results: take the cell from a results folder or from a SPEC/--preset, not both")
        if cell_id is None:
            raise UsageError("--cell: missing; --results needs the id of the cell to profile (the cell_id column)")
        spec, device = profile_lib.spec_of_results(results)
        spec, where = dataclasses.replace(spec, device=device), str(results)
    elif spec_file or preset:
        spec, where = load_sweep_spec(spec_file, preset)
    else:
        if cell_id is not None:
            raise UsageError("--cell: needs --results DIR, a SPEC or --preset to look the id up in")
        spec, where = cell_spec(**flags), "dsbench profile flags"
    cells = spec_lib.expand(spec, runner.resolve_device(spec.device))
    if cell_id is None:
        if len(cells) != 1:
            raise UsageError(f"--cell: {where} has {len(cells)} cells; choose one with --cell ID (`dsbench run sweep --dry-run` lists them)")
        return spec, cells[0].cell_id, where
    return spec, profile_lib.find_cell(cells, cell_id, where).cell_id, where


@app.command("presets")
def presets_cmd() -> None:
    """List the shipped presets."""
    table = Table("preset", "cells", "device", "description")
    for name in spec_lib.preset_names():
        s = spec_lib.load_preset(name)
        device = "cuda" if s.device == "cuda" else "cpu"  # a GPU preset may hold what only CUDA runs (CUDA graphs)
        table.add_row(name, str(len(spec_lib.expand(s, device))), device, s.description)
    out_console.print(table)


@app.command("workloads")
def workloads_cmd() -> None:
    """List the workloads (axes.workload values), each with its spec section's keys."""
    table = Table("workload", "description", "[section] keys")
    for name, keys, description in spec_lib.workload_sections():
        table.add_row(name, description, ", ".join(keys))
    out_console.print(table)


@app.command("env")
def env_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    calibrate: Annotated[bool, typer.Option(help="Also measure matmul FLOP/s and copy bandwidth.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (for --calibrate)")] = "auto",
    precision: Annotated[str, typer.Option(help="Precisions to calibrate, comma-separated.")] = "fp32,bf16",
) -> None:
    """Print this machine's environment (and, with --calibrate, its measured ceilings)."""
    from dsbench import runner

    with user_errors():
        resolved = runner.resolve_device(device)
        precisions = [p.strip() for p in precision.split(",")]
        allowed = registry.axis_values()["precision"]
        for p in precisions:
            spec_lib.check_choice("--precision", p, allowed)
    facts = runner.probe(resolved, precisions, calibrate)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    table = Table("field", "value", title="environment")
    for key, value in facts["environment"].items():
        table.add_row(key, str(value))
    out_console.print(table)
    if calibrate:
        out_console.print(peaks_table(facts["peaks"]))


@app.command("report")
def report_cmd(
    results: Annotated[list[Path], typer.Argument(metavar="RESULTS...", help="One or more results folders.")],
    out: Annotated[Optional[Path], typer.Option(help="Report folder; default reports/<run>.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="A results folder to compare each run with (default policy).")] = None,
) -> None:
    """Render results as index.html (self-contained), index.md, figures/*.png and tables/*.csv."""
    from dsbench.report import build_report

    with user_errors():
        path = build_report(results, out=out, baseline=baseline)
    out_console.print(f"report: {path / 'index.html'}  (and index.md, figures/, tables/)", highlight=False)


@app.command("check")
def check_cmd(
    baseline: Annotated[Path, typer.Option(help="The baseline results folder.")],
    current: Annotated[Path, typer.Option(help="The results folder to check.")],
    policy: Annotated[Optional[Path], typer.Option(help="Policy TOML laid over the shipped default (dsbench/policies/default.toml).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the Markdown summary.")] = False,
) -> None:
    """Compare results with a baseline under a policy: exit 0 clean, 1 regression, 2 usage error."""
    from dsbench import check as check_lib

    with user_errors():
        result = check_lib.check(baseline, current, check_lib.load_policy(policy))
    typer.echo(json.dumps(result.to_json(), indent=2) if as_json else result.markdown())
    raise typer.Exit(result.exit_code)


@app.command("ab")
def ab_cmd(
    spec_file: Annotated[Optional[Path], typer.Argument(metavar="[SPEC]", help="The sweep spec both sides run (TOML).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Or this checkout's preset of that name (its file is given to both sides).")] = None,
    base: Annotated[str, typer.Option(help="The commit to compare with: a sha, branch, tag or HEAD~N.")] = "HEAD~1",
    rounds: Annotated[int, typer.Option(help="Interleaved rounds: processes per cell and side (≥ policy timing.min_processes).")] = 5,
    threads: Annotated[int, typer.Option(help="OMP_NUM_THREADS for both sides' cells.")] = 1,
    out: Annotated[Optional[Path], typer.Option(help="Work folder (a new one); default a temporary folder.")] = None,
    policy: Annotated[Optional[Path], typer.Option(help="Policy TOML laid over the shipped default.")] = None,
    confirm: Annotated[bool, typer.Option(help="After a timing regression, run as many rounds again and decide on all.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the check's JSON instead of the Markdown summary.")] = False,
    metric: Annotated[str, typer.Option(help="time: the interleaved wall-clock A/B of SPEC; instructions: instruction counts "
                                             "per step of tiny fixed cells (valgrind or perf, deterministic; no SPEC).")] = "time",
    threshold: Annotated[Optional[float], typer.Option(help="--metric instructions: fail above ×(1 + THRESHOLD).")] = None,
) -> None:
    """Time this checkout against another commit on this machine, interleaved: exit 0 clean, 1 regression, 2 usage error."""
    from dsbench import ab as ab_lib
    from dsbench import check as check_lib

    if metric not in ("time", "instructions"):
        with user_errors():
            raise UsageError(f"--metric: {metric!r} is not one of time, instructions")
    if metric == "instructions":
        _ab_instructions(spec_file, preset, base, out, threshold)
    with user_errors():
        outcome = ab_lib.run_ab(base, spec_file, preset, rounds, out, check_lib.load_policy(policy), threads, confirm,
                                say=lambda line: err_console.print(line, highlight=False))
    typer.echo(json.dumps(outcome.result.to_json(), indent=2) if as_json else outcome.markdown())
    raise typer.Exit(outcome.result.exit_code)


def _ab_instructions(spec_file: Optional[Path], preset: Optional[str], base: str, out: Optional[Path], threshold: Optional[float]) -> None:
    from dsbench import instructions

    with user_errors():
        if spec_file or preset:  # the counted cells are fixed: a spec's cells would take hours under valgrind
            raise UsageError("--metric instructions counts its own tiny cells; give no SPEC or --preset")
        outcome = instructions.run_instructions_ab(base, out, instructions.THRESHOLD if threshold is None else threshold,
                                                   say=lambda line: err_console.print(line, highlight=False))
    typer.echo(outcome.markdown())
    raise typer.Exit(outcome.exit_code)


@app.command("baseline")
def baseline_cmd(
    results: Annotated[Path, typer.Argument(help="A results folder (e.g. of --preset ci).")],
    out: Annotated[Path, typer.Option(help="Where the baseline goes (a new folder).")],
) -> None:
    """Write the host-independent part of RESULTS (exact quantities, seeded losses) as a baseline for `dsbench check`."""
    from dsbench import check as check_lib

    with user_errors():
        folder = check_lib.write_baseline(results, out)
    typer.echo(f"baseline: {folder} (exact quantities and seeded losses; no timings)")


@app.command("claims")
def claims_cmd(
    results: Annotated[Optional[list[Path]], typer.Argument(metavar="[RESULTS]...", help="Results folders holding the empirical evidence (e.g. of --preset paper-cpu).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table with each claim's detail.")] = False,
) -> None:
    """The papers' efficiency claims and their verdicts: analytic from the official configs, empirical from RESULTS."""
    from dsbench import claims as claims_lib
    from dsbench.check import load_checked

    with user_errors():
        if as_json and as_markdown:
            raise UsageError("--json and --markdown: give one; each prints the claims in its own format")
        rows = claims_lib.evaluate([load_checked(p, "claims") for p in results or []])
    if as_json or as_markdown:
        typer.echo(claims_lib.to_json(rows) if as_json else claims_lib.markdown(rows))
        return
    out_console.print(claims_table(rows, claims_lib.HEADER, claims_lib.table_rows(rows)))
    for r in rows:
        out_console.print(styled((r.claim.id, "bold"), f": {r.evidence.detail}"), highlight=False, soft_wrap=True)


# --- rendering helpers ---


def apply_overrides(spec: spec_lib.SweepSpec, device: str | None, data: str | None) -> spec_lib.SweepSpec:
    import dataclasses

    if device is not None:
        spec_lib.check_choice("--device", device, spec_lib.DEVICES)
        spec = dataclasses.replace(spec, device=device)
    if data is not None:
        spec = dataclasses.replace(spec, data=data)
    return spec


def apply_executor_flags(spec: spec_lib.SweepSpec, sbatch: list[str] | None, **flags) -> spec_lib.SweepSpec:
    from dsbench.executors import with_overrides

    extra = None
    if sbatch:
        pairs = [item.partition("=") for item in sbatch]
        bad = next((item for item, (key, eq, _) in zip(sbatch, pairs) if not key or not eq), None)
        if bad is not None:
            raise UsageError(f"--sbatch: {bad!r} is not KEY=VALUE; give one #SBATCH parameter, e.g. --sbatch qos=high")
        extra = {**spec.executor.sbatch, **{key: value for key, _, value in pairs}}
    return dataclasses.replace(spec, executor=with_overrides(spec.executor, **flags, sbatch=extra))


def cells_table(cells, title: str, target=None) -> Table:
    """--dry-run's table; on a target GPU also whether each cell fits its memory and the fastest
    step its datasheet allows (≥ ms/step, c: compute-bound, m: memory-bound)."""
    from dsbench.accounting import static_row
    from dsbench.spec import kernel_plan

    named = AXES
    dotted = list(dict.fromkeys(k for cell in cells for k in cell.axes if k not in named))  # dotted-key axes
    on_target = ("fits", "≥ ms/step") if target else ()
    table = Table("cell_id", *named, *dotted, "shape", "params_total", "params_active", "flops/token", "kv B/token", "est. MiB",
                  *on_target, "kernels", title=title)
    table.columns[-1].overflow = "fold"  # the plan wraps, never cut to an ellipsis
    for cell in cells:
        row = static_row(cell)
        shape = cell.label().split(" ")[-1]
        table.add_row(row["cell_id"], *(row[a] for a in named), *(str(cell.axes.get(k, "")) for k in dotted), shape,
                      f"{row['params_total']:,}", f"{row['params_active']:,}", f"{row['flops_per_token']:.3g}", f"{row['kv_cache_bytes_per_token']:,}",
                      f"{row['memory_estimate_bytes'] / 2**20:,.1f}", *(target_cells(cell, target) if target else ()),
                      " ".join(f"{f}={impl}" for f, impl in kernel_plan(cell).items()) or "-")
    return table


def target_cells(cell, target) -> tuple[str, str]:
    ms, bound = targets.light_ms(cell, target)
    fits = "yes" if targets.memory_need(cell) <= target.memory_bytes else styled(("NO", "red"))
    return fits, (f"{ms:,.3g} {bound[0]}" if ms is not None else bound)


def claims_table(rows, header, cells) -> Table:
    style = {"reproduced": "green", "not reproduced": "red", "direction only": "yellow"}
    table = Table(*header, title=f"{len(rows)} claims")
    for row in cells:
        table.add_row(*row[:-1], styled((row[-1], style.get(row[-1], "dim"))))
    return table


def peaks_table(peaks: dict) -> Table:
    table = Table("precision", "peak FLOP/s", "source", "copy bytes/s", title="ceilings")
    for name, p in peaks.items():
        cal = p.get("calibration") or {}
        copy = cal.get("copy_bytes_per_s")
        table.add_row(name, f"{p['peak_flops_per_s']:.3e}" if p["peak_flops_per_s"] else "unknown", p["peak_source"], f"{copy:.3e}" if copy else "-")
    return table


def print_profile(summary: dict, folder: Path) -> None:
    """The per-part table (ms per step, roofline), the memory table, and how it was measured."""
    ceilings = summary["ceilings"]
    table = Table("part", "fwd ms", "bwd ms", "total ms", "share", "ops", "GFLOP/s", "GB/s", "FLOP/B", "bound", "of roof",
                  title=f"{summary['label']}: {summary['breakdown_ms_per_step']:.2f} ms per step ({summary['time_basis']}, {summary['steps_profiled']} steps)")
    for p in summary["parts"]:
        table.add_row(p["part"], f"{p['forward_ms']:.3f}", f"{p['backward_ms']:.3f}", f"{p['total_ms']:.3f}", _pct(p["share"]),
                      f"{p['ops_per_step']:.0f}",
                      _scaled(p["achieved_flops_per_s"], 1e9), _scaled(p["achieved_bytes_per_s"], 1e9),
                      _scaled(p["flops_per_byte"], 1), p["bound"] or "-", _pct(p["roof_fraction"]))
    out_console.print(table)
    memory = Table("memory", "MiB", "how", title="memory breakdown")
    for m in summary["memory"]:
        memory.add_row(m["category"], _scaled(m["bytes"], 2**20), m["how"])
    out_console.print(memory)
    out_console.print(
        f"ceilings: {_scaled(ceilings['peak_flops_per_s'], 1e9)} GFLOP/s, {_scaled(ceilings['bandwidth_bytes_per_s'], 1e9)} GB/s "
        f"({ceilings['source']})\n"
        f"named parts cover {_pct(summary['coverage'])} of the step; the breakdown sums to {_pct(summary['breakdown_vs_timer'])} of "
        f"the timer's total for the same steps\n"
        f"profiling overhead: {summary['step_ms_profiled']:.2f} ms profiled vs {summary['step_ms_unprofiled']:.2f} ms unprofiled "
        f"per step ({_pct(summary['overhead'])}; about {_scaled(summary['overhead_us_per_op'], 1)} µs for each of "
        f"{summary['ops_per_step']:.0f} ops a step: a part with many small ops is inflated the most)\n"
        f"trace: {folder / summary['trace']}  (ui.perfetto.dev or chrome://tracing); tables: {folder}", highlight=False, soft_wrap=True)


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{value:.1%}"


def _scaled(value, unit: float) -> str:
    return "-" if value is None or value != value else f"{value / unit:,.3g}"


def finish(outcome) -> None:
    from dsbench.contention import measurement_warnings
    from dsbench.results import load_results

    results = load_results(outcome.out)
    table = Table("cell", "status", "tokens/s", "step ms (p10–p90)", "mfu", "loss", title=f"run {outcome.run_id}")
    for _, r in results.cells.iterrows():
        ok = r["status"] == "ok"
        spread = f"{r['step_time_ms_median']:.2f} ({r['step_time_ms_p10']:.2f}–{r['step_time_ms_p90']:.2f})" if ok else "-"
        mfu = r.get("mfu")
        loss = r.get("final_loss")
        table.add_row(f"{r['cell_id'][:8]} {r['label']}", r["status"], f"{r['tokens_per_s_median']:,.0f}" if ok else "-", spread,
                      f"{mfu:.1%}" if ok and mfu == mfu and mfu is not None else "-",
                      f"{loss:.3f}" if ok and loss is not None and loss == loss else "-")
    out_console.print(table)
    out_console.print(f"results: {outcome.out}  ({outcome.ran} ran, {outcome.skipped} already recorded, {outcome.failed} failed)")
    warnings = measurement_warnings(results.cells)
    if warnings:
        err_console.print(styled((f"{len(warnings)} measurement(s) contended or noisy; compare their timings with care:", "yellow")))
        for line in warnings:
            err_console.print(styled("  ", (line, "yellow")))
    if outcome.interrupted:
        err_console.print(f"interrupted ({outcome.signal_name}): finished cells are kept; continue with --out {outcome.out} --resume")
        raise typer.Exit(143 if outcome.signal_name == "SIGTERM" else 130)
    if outcome.failed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
