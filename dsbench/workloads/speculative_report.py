"""Multi-token prediction (DeepSeek-V3 §2.2): the MTP section (the main head's loss by MTP depth,
paired with the mtp = 0 cell identical in everything else; speculative decoding's acceptance per
draft position and speed-up) and its figure. Present only when the results hold MTP cells, and
nothing here reads a column it has not checked for: results from before MTP have none of them."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from dsbench.claims.empirical import loss_of
from dsbench.claims.mtp import SPEEDUP, describe, loss_at_equal_flops, loss_curve, mtp_pairs, with_depth
from dsbench.metrics import metric_of
from dsbench.report.comparisons import DISTINCT
from dsbench.report.data import ReportData, display_name, fmt_num, present
from dsbench.report.figures import LINE_COLORS, figure
from dsbench.report.render import Section, write_csv
from dsbench.workloads import names_where

MAX_POSITIONS = 8  # accept_rate_pos1 … accept_rate_pos8 (the contract's widest draft)
# Formats until dsbench.metrics registers these columns (its entry wins once it does).
FALLBACK_FMT = {"mtp_lambda": "g", "params_mtp": "int", "train_steps": "int", "context_len": "int", "spec_speedup": "ratio",
                "verify_cost_ratio": "ratio", "accepted_len_mean": "g", "spec_matches_greedy": "bool",
                **{f"accept_rate_pos{k}": "pct" for k in range(1, MAX_POSITIONS + 1)}}


# --- the cells ---


def has_mtp(data: ReportData) -> bool:
    """Any ok cell trained with MTP (mtp or model.mtp > 0) or decoding speculatively."""
    ok = data.ok
    if ok["workload"].isin(_speculative()).any():
        return True
    return any((pd.to_numeric(ok[c], errors="coerce") > 0).any() for c in ("mtp", "model.mtp") if c in ok)


def of_workload(data: ReportData, workloads: tuple[str, ...]) -> pd.DataFrame:
    return with_depth(data.ok[data.ok["workload"].isin(workloads)])


def _speculative() -> tuple[str, ...]:
    """The workloads that train and then decode with the model they trained: this section's."""
    return tuple(set(names_where("trains_first")) & set(names_where("decodes")))


def positions(cells: pd.DataFrame) -> list[str]:
    """The accept_rate_pos<k> columns some cell has a value in, in order."""
    names = (f"accept_rate_pos{k}" for k in range(1, MAX_POSITIONS + 1))
    return [c for c in names if c in cells and cells[c].notna().any()]


def agreements(cells: pd.DataFrame) -> list[str]:
    """The eval_agreement_pos<k> columns (teacher-forced, held-out text) some cell has a value in."""
    names = (f"eval_agreement_pos{k}" for k in range(1, MAX_POSITIONS + 1))
    return [c for c in names if c in cells and cells[c].notna().any()]


def value(row: pd.Series, column: str) -> str:
    """A cell's value in the metric registry's format ('–' when absent)."""
    m = metric_of(column)
    return fmt_num(row.get(column), m.fmt if m else FALLBACK_FMT.get(column, "g"))


def curve(data: ReportData, row: pd.Series) -> pd.Series:
    series = data.series
    if series.empty or "metric" not in series:
        return pd.Series(dtype=float)
    return loss_curve(series[series["run"] == row["run"]], row["cell_id"])


# --- the main model's loss by MTP depth ---


def loss_rows(data: ReportData) -> pd.DataFrame:
    """One row per mtp ≥ 1 train cell: its losses and, where a mtp = 0 cell pairs with it, that
    cell's at equal steps and at equal training FLOPs (dsbench.claims.mtp's arithmetic)."""
    cells = of_workload(data, names_where("trains"))
    baseline = {(b["run"], b["cell_id"]): a for a, b in mtp_pairs(cells)}
    rows = []
    for _, r in cells[cells["mtp"] >= 1].iterrows():
        a = baseline.get((r["run"], r["cell_id"]))
        row = {"run": r["run"], "cell": display_name(r), "mtp": int(r["mtp"]), "mtp_lambda": r.get("mtp_lambda"),
               "params_mtp": r.get("params_mtp"), "eval_loss": r.get("eval_loss"), "eval_loss_mtp": r.get("eval_loss_mtp")}
        rows.append(row | (paired(data, a, r) if a is not None else {}))
    return pd.DataFrame(rows)


def paired(data: ReportData, a: pd.Series, b: pd.Series) -> dict:
    la, lb, kind = loss_of(a, b)
    out = {"base_cell": display_name(a), "loss_kind": kind, "base_loss": la, "mtp_loss": lb}
    match = loss_at_equal_flops(a, b, curve(data, a), curve(data, b))
    if match is not None:
        out |= {"flops_steps": match.steps, "flops_mtp_steps": match.mtp_steps, "flops_base_loss": match.base_loss,
                "flops_mtp_loss": match.mtp_loss}
    return out


def versus(mine, theirs) -> str:
    if not (present(mine) and present(theirs)):
        return "–"
    return f"{mine:.4f} vs {theirs:.4f} ({mine / theirs - 1:+.2%})"


def loss_table(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["cell", "mtp", "λ", "MTP params", "eval loss (main head)", "eval loss (MTP, mean of depths)",
              "vs mtp = 0, equal steps", "vs mtp = 0, equal FLOPs (train loss)"]
    rows = []
    for _, r in frame.iterrows():
        at = f"step {int(r['flops_mtp_steps'])}/{int(r['flops_steps'])}: " if present(r.get("flops_mtp_steps")) else ""
        flops = versus(r.get("flops_mtp_loss"), r.get("flops_base_loss"))
        rows.append([r["cell"], str(r["mtp"]), value(r, "mtp_lambda"), value(r, "params_mtp"), value(r, "eval_loss"),
                     value(r, "eval_loss_mtp"), versus(r.get("mtp_loss"), r.get("base_loss")), at + flops if flops != "–" else "–"])
    return header, rows


# --- speculative decoding ---


def speculative_rows(data: ReportData) -> pd.DataFrame:
    cells = of_workload(data, _speculative())
    keep = [c for c in ("run", "cell_id", "label", "mtp", "train_steps", "context_len", "new_tokens", *positions(cells),
                        *agreements(cells), "greedy_distinct_fraction", "pretrain_source", "accepted_len_mean", "spec_speedup", "verify_cost_ratio", "spec_tokens_per_s", "plain_tokens_per_s",
                        "spec_matches_greedy", "pretrain_final_loss", "device") if c in cells]
    order = [c for c in ("mtp", "train_steps", "context_len") if c in cells]
    return cells.sort_values(order, kind="stable")[keep] if order else cells[keep]


def speculative_table(data: ReportData) -> tuple[list[str], list[list[str]]]:
    cells = of_workload(data, _speculative())
    columns = [c for c in ("train_steps", "context_len", *positions(cells), *agreements(cells), "greedy_distinct_fraction",
                           "accepted_len_mean", "spec_speedup", "verify_cost_ratio", "spec_matches_greedy") if c in cells]
    heads = {"train_steps": "train steps", "context_len": "context", "accepted_len_mean": "tokens per verify",
             "spec_speedup": "speed-up", "verify_cost_ratio": "verify ÷ plain token", "spec_matches_greedy": "= greedy",
             "greedy_distinct_fraction": "distinct in greedy output"}
    header = ["cell", "mtp", *[heads.get(c, c.replace("accept_rate_pos", "accept pos ").replace("eval_agreement_pos", "held-out agree pos "))
                               for c in columns]]
    order = [c for c in ("mtp", "train_steps", "context_len") if c in cells]
    cells = cells.sort_values(order, kind="stable") if order else cells
    return header, [[display_name(r), str(r["mtp"]), *[value(r, c) for c in columns]] for _, r in cells.iterrows()]


# --- the section ---

LOSS_TEXT = ("Main-head loss of each MTP cell (comparable across depths: the MTP losses are apart), against the mtp = 0 "
             "cell identical in everything else (dsbench/pairing.py). Equal steps is DeepSeek-V3 Table 4's comparison "
             "(eval loss where both have it). Equal FLOPs charges MTP its training compute: the MTP cell's mean train "
             "loss over a final_loss-sized window ending at step steps × F0 ÷ F1 (flops_per_token without ÷ with MTP), "
             "against the baseline's last window.")
SPEC_TEXT = ("Self-speculative decoding: the MTP modules draft D tokens, one forward of the main model verifies them. "
             "accept pos k = P(draft k accepted | drafts 1 … k−1 accepted); DeepSeek-V3 §5.4.3 reports 85–90% for the "
             "second token (pos 1, D = 1) and 1.8× tokens/s. Speed-up = speculative ÷ plain greedy tokens/s, "
             "interleaved rounds of one cell. A small model's greedy output often loops on a few tokens (low 'distinct "
             "in greedy output'), which drafts match trivially; 'held-out agree pos k' is draft k against the main "
             "model's argmax on held-out text, teacher-forced: the acceptance free of such loops.")


def mtp_section(data: ReportData, tables) -> Section | None:
    """The MTP section, or None when no cell trained with MTP or decoded speculatively."""
    if not has_mtp(data):
        return None
    s = Section("Multi-token prediction (DeepSeek-V3 §2.2)")
    losses = loss_rows(data)
    if not losses.empty:
        write_csv(losses, tables, "mtp_loss")
        s.text(LOSS_TEXT)
        s.table(*loss_table(losses))
    spec = speculative_rows(data)
    if not spec.empty:
        write_csv(spec, tables, "mtp_speculative")
        s.text(SPEC_TEXT + " The figure 'MTP: acceptance and speed-up' plots them against train_steps and context length.")
        s.table(*speculative_table(data))
    if losses.empty and spec.empty:
        s.text("MTP cells are present but none is an ok train cell with mtp ≥ 1 or a speculative cell.")
    return s


# --- the figure ---


def _acceptance(ax, cells: pd.DataFrame, columns, title: str) -> None:
    """A rate per draft position against train_steps: one line per variant, depth and position
    (median over contexts)."""
    keyed = cells.assign(what=cells.apply(describe, axis=1))
    for i, (what, g) in enumerate(keyed.groupby("what", sort=False)):
        for k, column in enumerate(columns(g), start=1):
            line = g.groupby("train_steps")[column].median().dropna()
            ax.plot(line.index, 100 * line.values, marker="o", color=DISTINCT[i % len(DISTINCT)],
                    linestyle=("-", "--", ":", "-.")[(k - 1) % 4], label=f"{what} pos {k}")
    ax.axhspan(85, 90, color="#cccccc", alpha=0.5, label="V3 §5.4.3: 85–90%")
    ax.set(xlabel="training steps before decoding", ylabel="acceptance (%)", ylim=(0, 100), title=title)


def _speedup(ax, cells: pd.DataFrame) -> None:
    """Speed-up against context length: one line per variant, depth and train_steps."""
    keyed = cells.assign(what=cells.apply(describe, axis=1))
    for (what, steps), g in keyed.groupby(["what", "train_steps"], sort=False):
        line = g.groupby("context_len")["spec_speedup"].median().dropna()
        ax.plot(line.index, line.values, marker="o", label=f"{what}, {int(steps)} steps")
    ax.axhline(SPEEDUP, color="#888888", linestyle="--", linewidth=0.8, label=f"V3 §5.4.3: ×{SPEEDUP}")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set(xlabel="context length (tokens)", ylabel="tokens/s speculative ÷ plain")


@figure("mtp_speculative", "MTP: acceptance and speed-up", "Left: acceptance of each draft position during greedy "
        "generation against the training steps the model had before decoding (median over contexts; grey band: V3's "
        "85–90% for the second token); a looping greedy output makes it 0% or 100%. Middle: the same drafts on "
        "held-out text, teacher-forced (eval_agreement_pos k). Right: speculative ÷ plain greedy tokens/s against "
        "context length, one line per training length.",
        columns=("accept_rate_pos1", "spec_speedup", "train_steps", "context_len"))
def draw_mtp_speculative(data: ReportData):
    cells = of_workload(data, _speculative())
    cells = cells[cells["mtp"] >= 1]
    if cells.empty:
        return []
    fig = Figure(figsize=(15, 6), layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    right.set_prop_cycle(color=LINE_COLORS)
    _acceptance(left, cells, positions, "during greedy generation")
    _acceptance(middle, cells, agreements, "on held-out text (teacher-forced)")
    _speedup(right, cells)
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)  # below: never on the data
    return [("mtp_speculative", fig)]
