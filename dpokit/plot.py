"""Training curves of one or more runs, read from their `metrics.jsonl`, drawn as a grid of panels.

`read_metrics` reads a run's records; `plot_runs` draws them (one colour per run, training as lines,
validation as markers on lines, one marker shape per validation set) and writes a PNG, SVG or PDF.
matplotlib is an optional extra (`pip install 'dpokit[plot]'`); it is imported only when drawing,
without pyplot, so no global state changes.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dpokit.errors import DpokitError

METRICS_FILE = "metrics.jsonl"
SPLITS = ("train", "validation", "samples")  # samples: text records, not plotted
FORMATS = (".png", ".svg", ".pdf")
MISSING_MATPLOTLIB = "dpokit plot needs matplotlib: pip install 'dpokit[plot]'"
MIN_MATPLOTLIB = (3, 7)  # "outside" legend placement

PANEL_SIZE = (4.8, 3.4)  # inches
LEGEND_HEIGHT = 0.8  # inches
DPI = 100
TAB10 = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
LINE_STYLES = ("-", "--", ":", "-.")  # one per series of a panel
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per validation set
STYLE_COLOR = "#333333"  # legend entries for styles, not runs


@dataclass(frozen=True)
class Panel:
    """A quantity to draw. Each series is a tuple of alternative keys: a run's series uses the
    first key that any of its records has (e.g. `tokens_per_s`, else `tokens_per_s_rank0`)."""

    name: str  # what --metrics takes
    title: str
    series: tuple[tuple[str, ...], ...]
    series_labels: tuple[str, ...] = ()  # legend of the panel's own line styles, when it has several series


PANELS = (
    Panel("loss", "loss", (("preference_loss",),)),
    Panel("accuracy", "accuracy", (("acc",),)),
    Panel("reward_margin", "reward margin", (("reward_margin",),)),
    Panel("rewards", "rewards", (("rewards_chosen_mean",), ("rewards_rejected_mean",)), ("chosen", "rejected")),
    Panel("lr", "lr", (("lr",),)),
    Panel("grad_norm", "grad norm", (("grad_norm",),)),
    Panel("tokens_per_s", "tokens/s", (("tokens_per_s", "tokens_per_s_rank0"),)),
    Panel("sft_loss", "sft loss", (("sft_loss",),)),
    Panel("peak_memory", "peak memory (GiB)", (("peak_memory_gib",),)),
    Panel("mfu", "mfu", (("mfu",),)),
)


@dataclass(frozen=True)
class Run:
    label: str
    path: Path  # the metrics.jsonl file
    records: list[tuple[int, dict]]  # (line number, record), sorted by step


@dataclass(frozen=True)
class Curve:
    """One line of a panel: a run's series over the train records or one validation set."""

    run: str
    key: str
    series_index: int
    split: str
    dataset: str | None
    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class PanelInfo:
    name: str
    title: str
    box: tuple[float, float, float, float]  # axes (left, top, right, bottom) in image pixels, origin top-left
    runs: tuple[str, ...]  # labels of the runs drawn in it


@dataclass(frozen=True)
class PlotResult:
    """What `plot_runs` drew: the panels in drawing order, the run labels and their colours, and
    the figure geometry (a PNG is `size_px` pixels)."""

    output: Path
    panels: tuple[PanelInfo, ...]
    labels: tuple[str, ...]
    colors: dict[str, str]
    legend: tuple[str, ...]
    figsize: tuple[float, float]
    dpi: int

    @property
    def titles(self) -> list[str]:
        return [panel.title for panel in self.panels]

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) of the image in pixels."""
        return round(self.figsize[0] * self.dpi), round(self.figsize[1] * self.dpi)


def metrics_path(run_dir: str | Path) -> Path:
    """`RUN_DIR/metrics.jsonl`, or the path itself when it names the file."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.exists():
        raise DpokitError(f"{run_dir}: run directory not found")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise DpokitError(f"{run_dir}: no {METRICS_FILE} in it (is it a dpokit output_dir?)")
    return metrics


def _parse_record(line: str, where: str) -> dict:
    """One line of metrics.jsonl as a record, or a DpokitError naming `where` (file:line)."""
    if not line.strip():
        raise DpokitError(f"{where}: empty line (each line must be one JSON object)")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DpokitError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DpokitError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise DpokitError(f"{where}: 'step' must be an integer, got {step!r}")
    if record.get("split") not in SPLITS:
        raise DpokitError(f"{where}: 'split' must be one of {list(SPLITS)}, got {record.get('split')!r}")
    if not isinstance(record.get("dataset", ""), str):
        raise DpokitError(f"{where}: 'dataset' must be a string, got {record['dataset']!r}")
    return record


def _numbered_records(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DpokitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [(n, _parse_record(line, f"{path}:{n}")) for n, line in enumerate(text.splitlines(), start=1)]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's `metrics.jsonl` (`run_dir` may also name the file itself), in file
    order. Every line must be a JSON object with an integer `step` and a `split` of "train" or
    "validation" ("samples" records, text, are read and left out); any other line (a blank one
    too) is a DpokitError naming file:line."""
    return [record for _, record in _numbered_records(metrics_path(run_dir)) if record["split"] != "samples"]


def _label_candidates(path: Path) -> list[str]:
    """'run', 'outputs/run', 'tmp/outputs/run', ...: ever longer tails of the resolved path."""
    resolved = path.resolve()
    parts = [part for part in resolved.parts if part != resolved.anchor] or [str(resolved)]
    return ["/".join(parts[-depth:]) for depth in range(1, len(parts) + 1)]


def _number_duplicates(labels: list[str]) -> list[str]:
    """Second and later copies of a label get " (2)", " (3)"...."""
    seen: Counter[str] = Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def default_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name; runs whose names clash get as many parent folders as it takes
    to tell them apart (`a/run`, `b/run`); the same directory given twice gets numbered."""
    unique = list(dict.fromkeys(path.resolve() for path in run_dirs))
    candidates = [_label_candidates(path) for path in unique]
    depth = [0] * len(unique)
    while True:
        labels = [c[d] for c, d in zip(candidates, depth)]
        counts = Counter(labels)
        clashing = [i for i, label in enumerate(labels) if counts[label] > 1 and depth[i] + 1 < len(candidates[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    by_path = dict(zip(unique, labels))
    return _number_duplicates([by_path[path.resolve()] for path in run_dirs])


def _check_labels(labels: list[str], count: int) -> list[str]:
    if len(labels) != count:
        raise DpokitError(f"{len(labels)} label(s) for {count} run(s); give one label per run")
    if any(not label.strip() for label in labels):
        raise DpokitError(f"labels must not be empty: {labels!r}")
    return _number_duplicates([label.strip() for label in labels])


def _select_panels(metrics: list[str] | None) -> tuple[list[Panel], bool]:
    """The panels to try, and whether the user chose them (then one without data is an error)."""
    if not metrics:
        return list(PANELS), False
    by_name = {}
    for panel in PANELS:
        by_name[panel.name] = by_name[panel.title] = panel
    chosen = []
    for name in metrics:
        panel = by_name.get(name.strip().lower()) or by_name.get(name.strip().lower().replace(" ", "_"))
        if panel is None:
            raise DpokitError(f"unknown metric {name!r}; choose from {', '.join(p.name for p in PANELS)}")
        if panel not in chosen:
            chosen.append(panel)
    return chosen, True


def _number(value, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DpokitError(f"{where}: {key!r} must be a number, got {value!r}")
    return float(value)


def _run_curves(run: Run, panel: Panel) -> list[Curve]:
    """The run's curves in `panel`: per series, one over its train records and one per validation set."""
    curves = []
    for index, alternatives in enumerate(panel.series):
        key = next((k for k in alternatives if any(k in record for _, record in run.records)), None)
        if key is None:
            continue
        groups: dict[tuple[str, str | None], tuple[list[int], list[float]]] = {}
        for line, record in run.records:
            if key not in record:
                continue
            steps, values = groups.setdefault((record["split"], record.get("dataset")), ([], []))
            steps.append(record["step"])
            values.append(_number(record[key], key, f"{run.path}:{line}"))
        for (split, dataset), (steps, values) in groups.items():
            curves.append(Curve(run.label, key, index, split, dataset, steps, values))
    return curves


def _load_runs(run_dirs: list[Path], labels: list[str]) -> list[Run]:
    runs = []
    for run_dir, label in zip(run_dirs, labels):
        path = metrics_path(run_dir)
        records = _numbered_records(path)
        if not records:
            raise DpokitError(f"{run_dir}: {path.name} has no records")
        runs.append(Run(label, path, sorted(records, key=lambda item: item[1]["step"])))
    return runs


def _matplotlib():
    """(Figure, FigureCanvasAgg), or the DpokitError saying how to install matplotlib."""
    try:
        # The top-level package first: a blocked or missing one must fail here even when
        # its submodules were imported earlier.
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DpokitError(MISSING_MATPLOTLIB) from None
    version = tuple(int(part) for part in matplotlib.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_MATPLOTLIB:
        raise DpokitError(f"{MISSING_MATPLOTLIB} (needs matplotlib>=3.7, found {matplotlib.__version__})")
    return Figure, FigureCanvasAgg


def _run_colors(labels: list[str]) -> dict[str, str]:
    if len(labels) <= len(TAB10):
        return dict(zip(labels, TAB10))
    import matplotlib.colors

    cmap = matplotlib.colormaps["turbo"].resampled(len(labels))
    return {label: matplotlib.colors.to_hex(cmap(i)) for i, label in enumerate(labels)}


def _grid(count: int) -> tuple[int, int]:
    """(rows, columns): up to three panels a row; four make a 2 x 2 square."""
    columns = 2 if count in (2, 4) else min(count, 3)
    return math.ceil(count / columns), columns


def _draw_curve(ax, curve: Curve, color: str, validation_marker: str) -> None:
    style = LINE_STYLES[curve.series_index % len(LINE_STYLES)]
    if curve.split == "train":
        dot = "." if len(curve.steps) == 1 else None  # a single point draws no line
        ax.plot(curve.steps, curve.values, color=color, linestyle=style, linewidth=1.5, marker=dot)
    else:
        ax.plot(
            curve.steps,
            curve.values,
            color=color,
            linestyle=style,
            linewidth=1.0,
            marker=validation_marker,
            markersize=4,
        )


def _draw_panel(ax, panel: Panel, curves: list[Curve], colors: dict[str, str], markers: dict) -> None:
    for curve in curves:
        _draw_curve(ax, curve, colors[curve.run], markers.get(curve.dataset, MARKERS[0]))
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    keys = list(dict.fromkeys(curve.key for curve in curves))
    if len(panel.series) == 1:
        ax.set_ylabel(", ".join(keys))
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    if panel.series_labels:
        from matplotlib.lines import Line2D

        drawn = sorted({curve.series_index for curve in curves})
        handles = [
            Line2D([], [], color=STYLE_COLOR, linestyle=LINE_STYLES[i % len(LINE_STYLES)], label=panel.series_labels[i])
            for i in drawn
        ]
        ax.legend(handles=handles, fontsize="small")


def _legend_handles(labels, colors, curves: list[Curve], markers: dict) -> list:
    """Figure legend: a colour per run, then the train line and a marker per validation set."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[label], linewidth=2, label=label) for label in labels]
    if any(curve.split == "train" for curve in curves):
        handles.append(Line2D([], [], color=STYLE_COLOR, linewidth=1.5, label="train"))
    validation_sets = dict.fromkeys(curve.dataset for curve in curves if curve.split == "validation")
    for dataset in validation_sets:
        label = "validation" if dataset is None else f"validation: {dataset}"
        handles.append(Line2D([], [], color=STYLE_COLOR, linewidth=1.0, marker=markers[dataset], label=label))
    return handles


def _panels_with_data(panels: list[Panel], runs: list[Run], chosen: bool) -> list[tuple[Panel, list[Curve]]]:
    """Each panel with its curves, leaving out those no run has data for (an error for panels
    the user chose)."""
    drawn = [(panel, [curve for run in runs for curve in _run_curves(run, panel)]) for panel in panels]
    empty = [panel.name for panel, curves in drawn if not curves]
    if chosen and empty:
        raise DpokitError(f"no run has data for {', '.join(empty)}")
    drawn = [(panel, curves) for panel, curves in drawn if curves]
    if not drawn:
        raise DpokitError(f"no run has any of {', '.join(panel.name for panel in panels)}")
    return drawn


def _figure(Figure, drawn: list[tuple[Panel, list[Curve]]], labels: list[str], colors: dict[str, str]):
    """(figure, its axes in panel order, the figure legend's labels)."""
    all_curves = [curve for _, curves in drawn for curve in curves]
    datasets = dict.fromkeys(curve.dataset for curve in all_curves if curve.split == "validation")
    markers = {dataset: MARKERS[i % len(MARKERS)] for i, dataset in enumerate(datasets)}
    rows, columns = _grid(len(drawn))
    figsize = (columns * PANEL_SIZE[0], rows * PANEL_SIZE[1] + LEGEND_HEIGHT)
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    axes = []
    for i, (panel, curves) in enumerate(drawn):
        ax = fig.add_subplot(rows, columns, i + 1)
        _draw_panel(ax, panel, curves, colors, markers)
        axes.append(ax)
    handles = _legend_handles(labels, colors, all_curves, markers)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    return fig, axes, tuple(handle.get_label() for handle in handles)


def _save_atomically(fig, output: Path) -> None:
    """Write to a temporary name in the output's folder, then rename: a reader (or a crash)
    never sees half an image."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=output.suffix.lower()[1:], dpi=fig.dpi)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def _axes_box(ax, height_px: float) -> tuple[float, float, float, float]:
    box = ax.get_window_extent()  # display pixels, origin bottom-left
    return float(box.x0), float(height_px - box.y1), float(box.x1), float(height_px - box.y0)


def plot_runs(
    run_dirs: list[str | Path],
    output: str | Path,
    *,
    labels: list[str] | None = None,
    metrics: list[str] | None = None,
) -> PlotResult:
    """Draw the curves of `run_dirs` (each a run's output_dir, or its metrics.jsonl) into `output`
    (.png, .svg or .pdf), one panel per quantity of `PANELS` that some run has, or of `metrics`
    (panel names or titles, in that order; one that no run has is an error). `labels` name the
    runs in the legend (default: the directory names, told apart when they clash)."""
    output = Path(output)
    if output.suffix.lower() not in FORMATS:
        raise DpokitError(f"{output}: the output must end in .png, .svg or .pdf")
    if not run_dirs:
        raise DpokitError("no runs to plot")
    panels, chosen = _select_panels(metrics)
    Figure, FigureCanvasAgg = _matplotlib()
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    labels = default_labels(run_dirs) if labels is None else _check_labels(list(labels), len(run_dirs))
    runs = _load_runs(run_dirs, labels)

    drawn = _panels_with_data(panels, runs, chosen)
    colors = _run_colors(labels)
    fig, axes, legend = _figure(Figure, drawn, labels, colors)
    FigureCanvasAgg(fig)
    _save_atomically(fig, output)

    height_px = fig.get_figheight() * DPI
    infos = tuple(
        PanelInfo(panel.name, panel.title, _axes_box(ax, height_px), tuple(dict.fromkeys(c.run for c in curves)))
        for ax, (panel, curves) in zip(axes, drawn)
    )
    figsize = (float(fig.get_figwidth()), float(fig.get_figheight()))
    return PlotResult(output, infos, tuple(labels), colors, legend, figsize, DPI)
