"""Markdown reports with figures of a training run or a sweep (`diffmem report DIR`).

A RUN directory (diffmem-train's output: config.json, results.json, log.jsonl and the
nn-grid-*.png files) gets its memorization ratio per snapshot, the ratio and the training
loss over training, and the nearest-neighbour grids of its best and final snapshots.

A SWEEP directory (`diffmem sweep` / `diffmem emm`: summary.json and runs/) gets EMM per
entry, the memorization ratio vs |D| with each entry's EMM marked, EMM vs every factor
that takes more than one value, every run's ratio over training and, per entry, the grids
of the largest |D| that memorizes and the smallest that does not.

report.md is written beside the figures' folder report-figures/; every link in it is
relative to report.md's folder, and every file is written atomically.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import urllib.parse
from typing import Any, Callable

from ..training.checkpoint import write_atomic
from ..training.evaluate import RESULTS_FILE as RUN_RESULTS_FILE
from ..training.loop import LOG_FILE as RUN_LOG_FILE
from .summary import SUMMARY_FILE, SUMMARY_FORMAT, format_number

REPORT_FILE = "report.md"
FIGURES_DIR = "report-figures"
RUN_CONFIG_FILE = "config.json"
DEFAULT_EPS = 0.1
FIGURE_SIZE = (6.4, 4.0)
FIGURE_DPI = 100


# ----------------------------------------------------------------------------------------
# Reading


def read_json(path: pathlib.Path) -> Any:
    """A JSON file's content; a ValueError naming the file when it does not parse."""
    text = path.read_text()
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None


def _read_object(path: pathlib.Path) -> dict[str, Any]:
    """A JSON file that must hold an object."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_log(path: pathlib.Path) -> list[dict[str, Any]]:
    """log.jsonl's records; lines that do not parse (a crash mid-write) are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def check_results(results: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """results.json's snapshots, checked so a damaged file fails with its name."""
    snapshots = results.get("snapshots", [])
    if not isinstance(snapshots, list) or not all(
            isinstance(s, dict) and isinstance(s.get("ratio"), (int, float)) for s in snapshots):
        raise ValueError(f"{path}: not a diffmem results file (snapshots must be a list of objects with a ratio)")
    for which in ("max", "final"):
        if snapshots and not isinstance((results.get(which) or {}).get("ratio"), (int, float)):
            raise ValueError(f"{path}: not a diffmem results file (no {which} ratio)")
    return results


def _check_summary(summary: Any, path: pathlib.Path) -> dict[str, Any]:
    """summary.json's structure, checked up front so a bad file fails with its name."""
    def fail(what: str):
        raise ValueError(f"{path}: not a diffmem sweep summary ({what})")

    if not isinstance(summary, dict):
        fail(f"a JSON {type(summary).__name__}, expected an object")
    if summary.get("format") != SUMMARY_FORMAT:
        fail(f"format {summary.get('format')!r}, expected {SUMMARY_FORMAT!r}")
    if not isinstance(summary.get("entries"), list):
        fail("no list of entries")
    if not isinstance(summary.get("factors", []), list):
        fail("factors is not a list")
    for position, entry in enumerate(summary["entries"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("runs"), list):
            fail(f"entry {position} has no list of runs")
        if entry.get("emm") is not None and not isinstance(entry["emm"], dict):
            fail(f"entry {position}: emm is neither null nor an object")
        for run in entry["runs"]:
            if not isinstance(run, dict) or not isinstance(run.get("size"), int):
                fail(f"entry {position} has a run without an integer size")
    return summary


def directory_kind(directory: pathlib.Path) -> str:
    """'sweep' or 'run', by the files the directory holds."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory (expected a run or a sweep directory)")
    if (directory / SUMMARY_FILE).is_file():
        return "sweep"
    if (directory / RUN_CONFIG_FILE).is_file() or (directory / RUN_RESULTS_FILE).is_file():
        return "run"
    raise ValueError(f"{directory}: neither a sweep directory ({SUMMARY_FILE}) nor a run directory "
                     f"({RUN_CONFIG_FILE} / {RUN_RESULTS_FILE})")


# ----------------------------------------------------------------------------------------
# Markdown helpers


def _cell(value: Any) -> str:
    """Text for a Markdown table cell: pipes would end the cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return lines


def _link(target: pathlib.Path, report_dir: pathlib.Path) -> str:
    """target's path relative to report.md's folder, quoted for a Markdown link."""
    relative = os.path.relpath(target, report_dir)
    return urllib.parse.quote(pathlib.Path(relative).as_posix())


def _image(alt: str, target: pathlib.Path, report_dir: pathlib.Path) -> str:
    alt = re.sub(r"[\[\]]", "", alt)
    return f"![{alt}]({_link(target, report_dir)})"


def _ratio(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def emm_text(emm: dict[str, Any] | None) -> tuple[str, str]:
    """(EMM value, bracket) as table text: '41.3', '32..64'; '>= 64', '64..'; '< 16', '..16'."""
    if emm is None:
        return "n/a", ""
    if emm.get("bracketed"):
        return format_number(emm.get("value")), f"{emm['lower']}..{emm['upper']}"
    if emm.get("lower") is None:
        return f"< {emm.get('upper')}", f"..{emm.get('upper')}"
    return f">= {emm['lower']}", f"{emm['lower']}.."


# ----------------------------------------------------------------------------------------
# Figures


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("diffmem report draws its figures with matplotlib: "
                          "pip install matplotlib (or diffmem[report])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: pathlib.Path) -> pathlib.Path:
    """fig as a PNG at path, atomically; the figure is closed either way."""
    plt = _pyplot()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=FIGURE_DPI), "wb")
    finally:
        plt.close(fig)
    return path


def _new_figure():
    fig, ax = _pyplot().subplots(figsize=FIGURE_SIZE)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _log2_axis(ax, which: str) -> None:
    """A base-2 log scale on ax's 'x' or 'y' axis (sweep sizes and widths are usually powers
    of two), labelled 16, 32, ... rather than 2^4, 2^5."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=2)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def _threshold_line(ax, threshold: float) -> None:
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"1 - eps = {threshold:g}")


def _entry_colors(count: int) -> list:
    """One colour per entry, shared by every figure of a sweep report."""
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return [cycle[i % len(cycle)] for i in range(count)]


def _snapshot_points(results: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(epochs, ratio) of a run's evaluated snapshots, in training order."""
    snapshots = sorted((s for s in results.get("snapshots") or [] if s.get("ratio") is not None),
                       key=lambda s: s.get("nimg", 0))
    return [s.get("epochs", math.nan) for s in snapshots], [s["ratio"] for s in snapshots]


def ratio_over_training_figure(path: pathlib.Path, results: dict[str, Any], threshold: float) -> pathlib.Path:
    """A run's memorization ratio vs epochs, with the 1 - eps line."""
    fig, ax = _new_figure()
    epochs, ratios = _snapshot_points(results)
    ax.plot(epochs, ratios, marker="o", label="memorization ratio")
    _threshold_line(ax, threshold)
    ax.set(xlabel="epochs", ylabel="memorization ratio", ylim=(-0.03, 1.03), title="memorization ratio over training")
    ax.legend(loc="best", fontsize="small")
    return _save_figure(fig, path)


def loss_figure(path: pathlib.Path, log: list[dict[str, Any]]) -> pathlib.Path:
    """Training loss vs epochs from log.jsonl."""
    fig, ax = _new_figure()
    points = [(r["epoch"], r["loss"]) for r in log if isinstance(r.get("epoch"), (int, float))
              and isinstance(r.get("loss"), (int, float))]
    ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
    ax.set(xlabel="epochs", ylabel="training loss", title="training loss")
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# Run report


def _snapshot_entry(results: dict[str, Any], name: str | None) -> dict[str, Any] | None:
    for snapshot in results.get("snapshots") or []:
        if snapshot.get("snapshot") == name:
            return snapshot
    return None


def grid_path(run_dir: pathlib.Path, results: dict[str, Any], which: str) -> pathlib.Path | None:
    """The NN grid of a run's 'max' or 'final' snapshot, if one was drawn and is on disk."""
    snapshot = _snapshot_entry(results, (results.get(which) or {}).get("snapshot"))
    if snapshot is None or not snapshot.get("grid"):
        return None
    path = run_dir / snapshot["grid"]
    return path if path.is_file() else None


def _is_closed_form(config: dict[str, Any]) -> bool:
    """A `diffmem sample` directory: a closed-form denoiser, nothing trained."""
    return config.get("command") == "diffmem sample"


def _model_line(config: dict[str, Any]) -> str:
    if _is_closed_form(config):
        settings = {k: v for k, v in (config.get("regularization") or {}).items() if v is not None}
        shown = ", ".join(f"{k} {v}" for k, v in settings.items())
        return f"closed-form {config.get('model', 'optimal')} denoiser" + (f" ({shown})" if shown else "")
    options = config.get("config") or {}
    parameters = config.get("parameters")
    text = f"{options.get('arch', '?')}-{options.get('precond', '?')}, num_channels {options.get('num_channels', '?')}"
    if isinstance(parameters, int):
        text += f", {parameters:,} parameters"
    return text


def _dataset_line(config: dict[str, Any], results: dict[str, Any] | None) -> str:
    dataset = dict(config.get("dataset") or {})
    dataset.update((results or {}).get("dataset") or {})
    options = config.get("config") or {}
    text = f"{dataset.get('name', options.get('data', '?'))}, |D| = {dataset.get('size', options.get('size', '?'))}"
    resolution = dataset.get("resolution")
    if dataset.get("channels") is not None and isinstance(resolution, list):
        text += f", {dataset['channels']}x" + "x".join(map(str, resolution))
    if dataset.get("labels") is not None:
        text += f", labels {dataset['labels']}"
    return text


def _run_summary_lines(results: dict[str, Any], threshold: float) -> list[str]:
    """The memorization ratio (max and final) and the verdict at `threshold`."""
    snapshots = results.get("snapshots") or []
    if not snapshots or "max" not in results:
        return ["- memorization ratio: none (no snapshot was evaluated)"]
    best, final = results["max"], results["final"]
    samples = (results.get("evaluation") or {}).get("num_samples")
    verdict = "memorized" if best["ratio"] >= threshold else "not memorized"
    lines = [f"- memorization ratio: **{_ratio(best['ratio'])}** (max over {len(snapshots)} "
             f"snapshot{'s' * (len(snapshots) != 1)}, at {best.get('kimg', 0):g} kimg); "
             f"final {_ratio(final['ratio'])} (at {final.get('kimg', 0):g} kimg)"
             + (f"; {samples} samples per snapshot" if samples is not None else ""),
             f"- verdict: **{verdict}** (memorized when the ratio is >= {threshold:g})"]
    if results.get("complete") is False:
        lines.append("- results are incomplete: not every snapshot of the training has been evaluated")
    return lines


def _snapshot_table(results: dict[str, Any]) -> list[str]:
    rows = [[s.get("snapshot", ""), f"{s.get('kimg', 0):g}", f"{s.get('epochs', 0):g}", _ratio(s.get("ratio")),
             f"{s.get('n_memorized', '?')}/{s.get('n_samples', '?')}", format_number(s.get("knn_distance"), 2)]
            for s in sorted(results.get("snapshots") or [], key=lambda s: s.get("nimg", 0))]
    return _table(["snapshot", "kimg", "epochs", "ratio", "memorized", "knn distance"], rows)


def _run_grid_lines(run_dir: pathlib.Path, results: dict[str, Any], report_dir: pathlib.Path) -> list[str]:
    """The best snapshot's NN grid, and the final one's when it is another snapshot."""
    lines = []
    shown: set[pathlib.Path] = set()
    for which, title in (("max", "best snapshot"), ("final", "final snapshot")):
        snapshot = (results.get(which) or {}).get("snapshot")
        path = grid_path(run_dir, results, which)
        if path is None:
            lines += [f"{title} ({snapshot}): no grid on disk", ""]
        elif path in shown:
            lines += [f"{title}: the best one", ""]
        else:
            shown.add(path)
            lines += [f"{title} ({snapshot}, ratio {_ratio(results[which].get('ratio'))}):", "",
                      _image(f"nearest neighbours, {title}", path, report_dir), ""]
    return lines


def run_report(run_dir: pathlib.Path, report_dir: pathlib.Path, figures_dir: pathlib.Path,
               eps: float | None) -> str:
    """report.md's text for a run directory; its figures are written to figures_dir."""
    config_path, results_path = run_dir / RUN_CONFIG_FILE, run_dir / RUN_RESULTS_FILE
    config = _read_object(config_path) if config_path.is_file() else {}
    results = check_results(_read_object(results_path), results_path) if results_path.is_file() else None
    if eps is None:
        threshold = (results or {}).get("memorized_threshold", 1 - DEFAULT_EPS)
    else:
        threshold = 1 - eps

    lines = [f"# Run report: {run_dir.resolve().name}", "",
             f"- dataset: {_dataset_line(config, results)}",
             f"- model: {_model_line(config) if config else f'unknown ({RUN_CONFIG_FILE} is missing)'}"]
    if results is None:
        lines += [f"- memorization ratio: none ({RUN_RESULTS_FILE} is missing: the run has not been evaluated)", ""]
    else:
        lines += _run_summary_lines(results, threshold) + [""]
    trained = not _is_closed_form(config)  # a closed-form denoiser has no training to draw
    if results and results.get("snapshots"):
        lines += ["## Snapshots", "", *_snapshot_table(results), ""]
        if trained:
            lines += ["## Memorization ratio over training", "",
                      _image("memorization ratio over training",
                             ratio_over_training_figure(figures_dir / "ratio-over-training.png", results, threshold),
                             report_dir), ""]
    if trained:
        log = read_log(run_dir / RUN_LOG_FILE)
        lines += ["## Training loss", ""]
        if log:
            lines += [_image("training loss", loss_figure(figures_dir / "loss.png", log), report_dir), ""]
        else:
            lines += [f"no training log ({RUN_LOG_FILE} is missing or empty)", ""]
    if results and results.get("snapshots"):
        lines += ["## Nearest-neighbour grids", "",
                  "Generated samples beside their two nearest training images; memorized samples are framed red.",
                  "", *_run_grid_lines(run_dir, results, report_dir)]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------
# Sweep report


class SweepRun:
    """One run of a sweep entry, with its results.json when it can be read."""

    def __init__(self, sweep_dir: pathlib.Path, record: dict[str, Any]):
        self.record = record
        self.size: int = record["size"]
        self.ratio: float | None = record.get("ratio")
        self.status: str = record.get("status", "?")
        self.run_dir = sweep_dir / str(record.get("run_dir", ""))
        self.results: dict[str, Any] | None = None
        self.problem: str | None = None  # why results.json is unusable
        results_path = self.run_dir / RUN_RESULTS_FILE
        try:
            self.results = check_results(_read_object(results_path), results_path)
        except FileNotFoundError:
            self.problem = f"no {RUN_RESULTS_FILE}"
        except (OSError, ValueError) as err:
            # One unreadable run must not stop the report of the others.
            self.problem = str(err)

    @property
    def finished(self) -> bool:
        """A run that counts: done, with a ratio."""
        return self.status == "done" and self.ratio is not None


class SweepEntryView:
    """A summary entry, its runs and its EMM (recomputed when the report's eps differs)."""

    def __init__(self, sweep_dir: pathlib.Path, entry: dict[str, Any], emm: dict[str, Any] | None):
        self.entry = entry
        self.index = entry.get("index")
        self.label: str = str(entry.get("label", f"entry {entry.get('index')}"))
        self.factors: dict[str, Any] = entry.get("factors") or {}
        self.factor_values: dict[str, Any] = entry.get("factor_values") or self.factors
        self.status: str = entry.get("status", "?")
        self.emm = emm
        self.runs = sorted((SweepRun(sweep_dir, r) for r in entry["runs"]), key=lambda r: r.size)

    @property
    def finished_runs(self) -> list[SweepRun]:
        return [r for r in self.runs if r.finished]


def _entry_emm(entry: dict[str, Any], summary: dict[str, Any], eps: float) -> dict[str, Any] | None:
    """The entry's EMM at eps: summary.json's, or recomputed from its runs' ratios at another eps
    (without a confidence interval: the bootstrap needs the sweep's per-sample flags)."""
    if math.isclose(eps, summary.get("eps", DEFAULT_EPS)):
        return entry.get("emm")
    from .estimate import estimate

    done = [r for r in entry["runs"] if r.get("status") == "done" and r.get("ratio") is not None]
    if not done:
        return None
    return estimate([r["size"] for r in done], [r["ratio"] for r in done], eps=eps,
                    log=summary.get("interpolation") == "log").to_dict()


def _emm_table(entries: list[SweepEntryView], factors: list[str]) -> list[str]:
    rows = []
    for view in entries:
        emm = view.emm or {}
        value, bracket = emm_text(view.emm)
        ci = emm.get("ci")
        ci_text = f"{ci[0]:.1f}..{ci[1]:.1f}" if ci else ""
        if ci and emm.get("ci_level") is not None:
            ci_text += f" ({100 * emm['ci_level']:g}%)"
        monotone = "" if emm.get("monotone") is None else ("yes" if emm["monotone"] else "no")
        rows.append([view.index, *[view.factors.get(f, "") for f in factors], value, bracket, ci_text, monotone,
                     len(view.finished_runs), view.status])
    return _table(["#", *factors, "EMM", "bracket", "CI", "monotone", "runs", "status"], rows)


def _mark_emm(ax, emm: dict[str, Any] | None, threshold: float, color) -> None:
    """EMM on the ratio-vs-|D| axes: a star on the 1 - eps line and a dotted vertical line;
    an unbracketed EMM as an open triangle at its known bound pointing where EMM lies."""
    if emm is None:
        return
    if emm.get("bracketed") and emm.get("value") is not None:
        ax.axvline(emm["value"], color=color, linestyle=":", linewidth=1)
        ax.plot([emm["value"]], [threshold], marker="*", markersize=14, color=color, linestyle="none")
    elif emm.get("lower") is not None:
        ax.plot([emm["lower"]], [threshold], marker=">", markersize=9, markerfacecolor="none", color=color,
                linestyle="none")
    elif emm.get("upper") is not None:
        ax.plot([emm["upper"]], [threshold], marker="<", markersize=9, markerfacecolor="none", color=color,
                linestyle="none")


def ratio_vs_size_figure(path: pathlib.Path, entries: list[SweepEntryView], threshold: float,
                         colors: list) -> pathlib.Path:
    """Memorization ratio vs |D| (log axis), one curve per entry, EMM marked."""
    fig, ax = _new_figure()
    for view, color in zip(entries, colors):
        runs = view.finished_runs
        label = view.label if runs else f"{view.label} (no finished run)"
        ax.plot([r.size for r in runs], [r.ratio for r in runs], marker="o", color=color, label=label)
        _mark_emm(ax, view.emm, threshold, color)
    _threshold_line(ax, threshold)
    _log2_axis(ax, "x")
    ax.set(xlabel="|D| (training images)", ylabel="memorization ratio", ylim=(-0.03, 1.03),
           title="memorization ratio vs |D|")
    ax.legend(loc="best", fontsize="x-small")
    return _save_figure(fig, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def varying_factors(entries: list[SweepEntryView], factors: list[str]) -> list[str]:
    """The factors that take more than one value over the entries."""
    return [f for f in factors if len({str(view.factors.get(f)) for view in entries}) > 1]


def _factor_axis(entries: list[SweepEntryView],
                 factor: str) -> tuple[Callable[[SweepEntryView], float], list[str] | None]:
    """x position of an entry for `factor`: its value when every value is a number, else the
    position of its display string among the categories in entry order (returned too)."""
    if all(_is_number(view.factor_values.get(factor)) for view in entries):
        return (lambda view: float(view.factor_values[factor])), None
    categories: list[str] = []
    for view in entries:
        if str(view.factors.get(factor)) not in categories:
            categories.append(str(view.factors.get(factor)))
    return (lambda view: float(categories.index(str(view.factors.get(factor))))), categories


def _series(entries: list[SweepEntryView], factor: str, factors: list[str]) -> dict[str, list[SweepEntryView]]:
    """Entries grouped by the values of the other factors, labelled by them."""
    groups: dict[str, list[SweepEntryView]] = {}
    others = [f for f in factors if f != factor]
    for view in entries:
        label = ", ".join(f"{f}={view.factors.get(f)}" for f in others) or "EMM"
        groups.setdefault(label, []).append(view)
    return groups


def emm_vs_factor_figure(path: pathlib.Path, entries: list[SweepEntryView], factor: str,
                         factors: list[str]) -> pathlib.Path:
    """EMM vs one factor, one series per combination of the others. Bracketed EMMs are filled
    markers joined by lines (bars: CI); an unbracketed EMM is an open triangle at its known
    bound, pointing up (EMM >= lower) or down (EMM < upper); entries without EMM are left out."""
    fig, ax = _new_figure()
    position, categories = _factor_axis(entries, factor)
    for series, (label, views) in enumerate(_series(entries, factor, factors).items()):
        color = f"C{series % 10}"
        bracketed = sorted((position(v), v.emm) for v in views
                           if v.emm and v.emm.get("bracketed") and v.emm.get("value") is not None)
        xs, values = [x for x, _ in bracketed], [emm["value"] for _, emm in bracketed]
        # Categories have no order to join; numbers do.
        ax.plot(xs, values, marker="o", color=color, label=label, linestyle="none" if categories is not None else "-")
        for x, emm in bracketed:
            if emm.get("ci"):
                # A bar from lo to hi, not an error bar: a bootstrap interval need not contain the estimate.
                ax.plot([x, x], emm["ci"], marker="_", markersize=8, color=color, linewidth=1)
        for view in views:
            emm = view.emm
            if not emm or emm.get("bracketed"):
                continue
            bound, marker = (emm["lower"], "^") if emm.get("lower") is not None else (emm.get("upper"), "v")
            if bound is not None:
                ax.plot([position(view)], [bound], marker=marker, markersize=9, markerfacecolor="none", color=color,
                        linestyle="none")
    if categories is not None:
        long_labels = len(categories) > 4 or max(len(c) for c in categories) > 12
        ax.set_xticks(range(len(categories)), categories, rotation=25 if long_labels else 0,
                      ha="right" if long_labels else "center", fontsize="small")
        ax.set_xlim(-0.5, len(categories) - 0.5)  # keep the end categories off the frame
    elif _log_scale_fits([position(v) for v in entries]):
        _log2_axis(ax, "x")
    if ax.has_data() and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
        _log2_axis(ax, "y")
    ax.set(xlabel=factor, ylabel="EMM (|D|)", title=f"EMM vs {factor}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="x-small")
    return _save_figure(fig, path)


def _log_scale_fits(values: list[float]) -> bool:
    """Positive values spread over a factor of 4 or more (widths, sizes) read better on a log axis."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 4


def training_figure(path: pathlib.Path, entries: list[SweepEntryView], threshold: float,
                    colors: list) -> pathlib.Path:
    """Every run's memorization ratio vs epochs: the entry's colour, the |D| written at the line's end."""
    fig, ax = _new_figure()
    for view, color in zip(entries, colors):
        labelled = False
        for run in view.runs:
            if run.results is None:
                continue
            epochs, ratios = _snapshot_points(run.results)
            if not ratios:
                continue
            ax.plot(epochs, ratios, marker=".", color=color, alpha=0.8, label=None if labelled else view.label)
            ax.annotate(f"{run.size}", (epochs[-1], ratios[-1]), fontsize="xx-small", color=color,
                        xytext=(3, 0), textcoords="offset points")
            labelled = True
    _threshold_line(ax, threshold)
    ax.set(xlabel="epochs", ylabel="memorization ratio", ylim=(-0.03, 1.03),
           title="memorization over training (numbers: |D|)")
    ax.legend(loc="best", fontsize="x-small")
    return _save_figure(fig, path)


def _sweep_grid_lines(view: SweepEntryView, threshold: float, metric: str, report_dir: pathlib.Path) -> list[str]:
    """The grids of the largest |D| that memorizes and the smallest that does not."""
    runs = view.finished_runs
    memorizing = [r for r in runs if r.ratio >= threshold]
    not_memorizing = [r for r in runs if r.ratio < threshold]
    picks = [("largest |D| that memorizes", memorizing[-1] if memorizing else None),
             ("smallest |D| that does not memorize", not_memorizing[0] if not_memorizing else None)]
    lines = [f"### {view.label}", ""]
    for title, run in picks:
        if run is None:
            lines += [f"- {title}: none", ""]
            continue
        path = grid_path(run.run_dir, run.results, metric) if run.results is not None else None
        lines.append(f"- {title}: |D| = {run.size}, ratio {_ratio(run.ratio)}")
        if path is None:
            lines += ["  (no grid on disk)", ""]
        else:
            lines += ["", _image(f"{view.label}, |D|={run.size}", path, report_dir), ""]
    return lines


def _missing_lines(entries: list[SweepEntryView]) -> list[str]:
    rows = [[view.label, run.size, run.status, run.problem or "", run.record.get("error") or "",
             run.record.get("run_dir", "")]
            for view in entries for run in view.runs if run.results is None or not run.finished]
    if not rows:
        return []
    return ["## Runs without results", "",
            *_table(["entry", "|D|", "status", "results", "error", "run directory"], rows), ""]


def _figure_name(prefix: str, name: str) -> str:
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name).strip('-') or 'factor'}.png"


def sweep_report(sweep_dir: pathlib.Path, report_dir: pathlib.Path, figures_dir: pathlib.Path,
                 eps: float | None) -> str:
    """report.md's text for a sweep directory; its figures are written to figures_dir."""
    summary_path = sweep_dir / SUMMARY_FILE
    summary = _check_summary(read_json(summary_path), summary_path)
    eps = summary.get("eps", DEFAULT_EPS) if eps is None else eps
    threshold = 1 - eps
    factors = [str(f) for f in summary.get("factors") or []]
    metric = summary.get("metric", "max")
    entries = [SweepEntryView(sweep_dir, e, _entry_emm(e, summary, eps)) for e in summary["entries"]]
    colors = _entry_colors(len(entries))

    lines = [f"# Sweep report: {summary.get('name', sweep_dir.resolve().name)}", "",
             f"- {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}; factors: {', '.join(factors) or 'none'}",
             f"- memorized when a run's ratio ({metric} over its snapshots) is >= {threshold:g} (eps = {eps:g})"]
    if not math.isclose(eps, summary.get("eps", DEFAULT_EPS)):
        lines.append(f"- EMM recomputed at eps = {eps:g} (the sweep used {summary.get('eps', DEFAULT_EPS):g}); "
                     "no confidence intervals")
    lines += ["", "## EMM per entry", "", *_emm_table(entries, factors), "",
              "EMM: the |D| where the ratio, interpolated inside its bracket, crosses 1 - eps. '>= N': N "
              "memorizes and no larger size tried does not; '< N': no size tried memorizes, N is the smallest; "
              "n/a: no finished run.",
              ""]
    if not entries:
        return "\n".join(lines).rstrip() + "\n"
    if not any(view.finished_runs for view in entries):  # nothing to draw (yet)
        lines += ["No run has finished: no figures.", ""]
        lines += _missing_lines(entries)
        return "\n".join(lines).rstrip() + "\n"

    lines += ["## Memorization ratio vs |D|", "",
              _image("memorization ratio vs |D|",
                     ratio_vs_size_figure(figures_dir / "ratio-vs-size.png", entries, threshold, colors), report_dir),
              "", "Stars and dotted lines: EMM; open triangles: the known bound of an unbracketed EMM.", ""]
    lines += _emm_vs_factor_lines(entries, factors, report_dir, figures_dir)
    lines += ["## Memorization over training", "",
              _image("memorization over training",
                     training_figure(figures_dir / "training.png", entries, threshold, colors), report_dir), ""]
    lines += ["## Nearest-neighbour grids", "",
              f"Per entry, the grid of the {metric} snapshot of the largest |D| that memorizes and of the smallest "
              "that does not; memorized samples are framed red.", ""]
    for view in entries:
        lines += _sweep_grid_lines(view, threshold, metric, report_dir)
    lines += _missing_lines(entries)
    return "\n".join(lines).rstrip() + "\n"


def _emm_vs_factor_lines(entries: list[SweepEntryView], factors: list[str], report_dir: pathlib.Path,
                         figures_dir: pathlib.Path) -> list[str]:
    lines = []
    for factor in varying_factors(entries, factors):
        figure = emm_vs_factor_figure(figures_dir / _figure_name("emm-vs", factor), entries, factor, factors)
        left_out = [v.label for v in entries if v.emm is None]
        lines += [f"## EMM vs {factor}", "", _image(f"EMM vs {factor}", figure, report_dir), "",
                  "Filled markers: EMM (bars: confidence interval); open triangles: an unbracketed EMM at its "
                  "known bound, pointing up (EMM >= bound) or down (EMM < bound)."
                  + (f" Without EMM, not drawn: {'; '.join(left_out)}." if left_out else ""), ""]
    return lines


# ----------------------------------------------------------------------------------------
# Entry point


def write_report(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 eps: float | None = None) -> pathlib.Path:
    """Write report.md for a run or a sweep directory (to `out`, default DIR/report.md) and its
    figures to report-figures/ beside it. eps: memorized when ratio >= 1 - eps (default: the
    sweep's, or the run's threshold, else 0.1). Returns report.md's path."""
    directory = pathlib.Path(path)
    kind = directory_kind(directory)
    if eps is not None and not 0 < eps < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    report_path = pathlib.Path(out) if out is not None else directory / REPORT_FILE
    report_dir = report_path.parent
    figures_dir = report_dir / FIGURES_DIR  # created by the first figure: bad input leaves nothing behind
    build = sweep_report if kind == "sweep" else run_report
    text = build(directory, report_dir, figures_dir, eps)
    write_atomic(report_path, lambda file: file.write(text), "w")
    return report_path
