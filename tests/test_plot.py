"""`dpokit plot` and dpokit.plot: reading metrics.jsonl and drawing the curves, checked in the pixels."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from dpokit.errors import DpokitError
from dpokit.plot import MISSING_MATPLOTLIB, PANELS, TAB10, plot_runs, read_metrics

DEFAULT_TITLES = ["loss", "accuracy", "reward margin", "rewards", "lr", "grad norm", "tokens/s"]


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def train_record(step: int, scale: float, **extra) -> dict:
    """A train record whose every curve differs between runs of different `scale`."""
    chosen, rejected = 0.01 * scale * step, -0.005 * scale * step
    return {
        "step": step,
        "split": "train",
        "loss": 0.69 - 0.01 * scale * step,
        "preference_loss": 0.69 - 0.01 * scale * step + 0.002 * math.sin(step),
        "acc": min(1.0, 0.5 + 0.03 * scale * step),
        "rewards_chosen_mean": chosen,
        "rewards_rejected_mean": rejected,
        "reward_margin": chosen - rejected,
        "logps_chosen": -100.0,
        "logps_rejected": -101.0,
        "lr": 1e-4 * scale * min(1.0, step / 4),
        "grad_norm": 0.1 * scale + 0.02 * math.sin(step),
        "tokens_per_s_rank0": 1000.0 * scale + 20 * step,
        "step_s": 0.1,
        "policy_s": 0.05,
        **extra,
    }


def validation_record(step: int, scale: float, dataset: str | None = None) -> dict:
    record = {
        "step": step,
        "split": "validation",
        "loss": 0.69 - 0.008 * scale * step,
        "preference_loss": 0.69 - 0.008 * scale * step,
        "acc": min(1.0, 0.5 + 0.025 * scale * step),
        "reward_margin": 0.012 * scale * step,
        "rewards_chosen_mean": 0.008 * scale * step,
        "rewards_rejected_mean": -0.004 * scale * step,
    }
    return record if dataset is None else {**record, "dataset": dataset}


def write_run(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def make_run(run_dir, scale, *, datasets=(None,), steps=12, eval_every=4, **extra):
    records = []
    for step in range(steps + 1):
        if step % eval_every == 0:
            records += [validation_record(step, scale + 0.3 * i, name) for i, name in enumerate(datasets)]
        if step:
            records.append(train_record(step, scale, **extra))
    return write_run(run_dir, records)


def colour_pixels(image, box, colour, tol=0.02) -> int:
    """How many pixels inside the axes `box` (2 px in from the spines) are `colour`."""
    from matplotlib.colors import to_rgb

    left, top, right, bottom = box
    region = image[math.ceil(top) + 2 : math.floor(bottom) - 2, math.ceil(left) + 2 : math.floor(right) - 2, :3]
    return int(np.all(np.abs(region - np.array(to_rgb(colour))) < tol, axis=-1).sum())


def assert_drawn(result, expected_titles):
    """The PNG has the figure's pixel size, and each panel's axes hold pixels of the colour of
    every run the panel reports, and of no other run."""
    from matplotlib.image import imread

    image = imread(result.output)
    width, height = result.size_px
    assert (width, height) == (round(result.figsize[0] * result.dpi), round(result.figsize[1] * result.dpi))
    assert image.shape[:2] == (height, width)
    assert result.titles == expected_titles
    for panel in result.panels:
        left, top, right, bottom = panel.box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, panel
        assert right - left > 100 and bottom - top > 100, panel
        for label, colour in result.colors.items():
            count = colour_pixels(image, panel.box, colour)
            if label in panel.runs:
                assert count >= 10, f"{panel.title}: {label} ({colour}) not drawn"
            else:
                assert count == 0, f"{panel.title}: {label} ({colour}) drawn but has no data"
        unused = next(c for c in TAB10 if c not in result.colors.values())
        assert colour_pixels(image, panel.box, unused) == 0  # the check is not vacuous


def test_two_runs_every_panel_shows_both_runs_and_named_validation_sets(tmp_path, mpl):
    a = make_run(tmp_path / "lr_1e-4", 1.0)
    b = make_run(tmp_path / "lr_3e-4", 2.0, datasets=("helpful", "harmless"))
    result = plot_runs([a, b], tmp_path / "curves.png")
    assert_drawn(result, DEFAULT_TITLES)
    assert result.labels == ("lr_1e-4", "lr_3e-4")
    assert all(panel.runs == ("lr_1e-4", "lr_3e-4") for panel in result.panels)
    assert result.legend == ("lr_1e-4", "lr_3e-4", "train", "validation", "validation: helpful", "validation: harmless")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "lr_1e-4", "lr_3e-4"]  # no temp file left


def test_optional_panels_appear_only_with_their_keys(tmp_path, mpl):
    a = make_run(tmp_path / "a", 1.0, sft_loss=0.5, peak_memory_gib=3.2, mfu=0.4, tokens_per_s=5000.0)
    b = make_run(tmp_path / "b", 2.0)
    result = plot_runs([a, b], tmp_path / "curves.png")
    assert_drawn(result, [*DEFAULT_TITLES, "sft loss", "peak memory (GiB)", "mfu"])
    runs = {panel.title: panel.runs for panel in result.panels}
    assert runs["sft loss"] == runs["peak memory (GiB)"] == runs["mfu"] == ("a",)
    assert runs["tokens/s"] == ("a", "b")  # tokens_per_s for a, tokens_per_s_rank0 for b


def test_panel_without_data_is_skipped(tmp_path, mpl):
    records = [{k: v for k, v in train_record(s, 1.0).items() if k not in ("lr", "grad_norm")} for s in (1, 2, 3)]
    result = plot_runs([write_run(tmp_path / "run", records)], tmp_path / "curves.png")
    assert_drawn(result, ["loss", "accuracy", "reward margin", "rewards", "tokens/s"])
    assert result.legend == ("run", "train")  # no validation records, no validation entry


def test_metrics_picks_panels_in_the_given_order(tmp_path, mpl):
    run = make_run(tmp_path / "run", 1.0)
    result = plot_runs([run], tmp_path / "curves.svg", metrics=["grad_norm", "loss", "reward margin"])
    assert result.titles == ["grad norm", "loss", "reward margin"]
    assert "<svg" in (tmp_path / "curves.svg").read_text()
    with pytest.raises(DpokitError, match=r"^unknown metric 'los'; choose from loss, accuracy, reward_margin"):
        plot_runs([run], tmp_path / "x.png", metrics=["los"])
    with pytest.raises(DpokitError, match=r"^no run has data for mfu$"):
        plot_runs([run], tmp_path / "x.png", metrics=["loss", "mfu"])
    assert not (tmp_path / "x.png").exists()


def test_labels(tmp_path, mpl):
    a = make_run(tmp_path / "a" / "run", 1.0)
    b = make_run(tmp_path / "b" / "run", 2.0)
    assert plot_runs([a, b], tmp_path / "c.png").labels == ("a/run", "b/run")
    assert plot_runs([a, a], tmp_path / "c.png").labels == ("run", "run (2)")
    assert plot_runs([a, b], tmp_path / "c.png", labels=["base", "tuned"]).labels == ("base", "tuned")
    with pytest.raises(DpokitError, match=r"^1 label\(s\) for 2 run\(s\); give one label per run$"):
        plot_runs([a, b], tmp_path / "c.png", labels=["base"])


def test_output_must_be_an_image_format_and_is_replaced_whole(tmp_path, mpl):
    run = make_run(tmp_path / "run", 1.0)
    with pytest.raises(DpokitError, match=r"curves\.jpg: the output must end in \.png, \.svg or \.pdf$"):
        plot_runs([run], tmp_path / "curves.jpg")
    output = tmp_path / "out" / "curves.png"
    output.parent.mkdir()
    output.write_text("old")
    plot_runs([run], output)
    assert output.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in output.parent.iterdir()] == ["curves.png"]


def test_read_metrics_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = json.dumps(train_record(1, 1.0))
    path.write_text(good + '\n{"step": 2, "split": "train", "loss": 0.6\n')
    with pytest.raises(DpokitError) as error:
        read_metrics(tmp_path)
    assert str(error.value) == f"{path}:2: not valid JSON (Expecting ',' delimiter at column 42)"
    for line, message in [
        ("", "empty line (each line must be one JSON object)"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"split": "train"}', "'step' must be an integer, got None"),
        ('{"step": 3, "split": "test"}', "'split' must be one of ['train', 'validation', 'samples'], got 'test'"),
        ('{"step": 3, "split": "validation", "dataset": 7}', "'dataset' must be a string, got 7"),
    ]:
        path.write_text(f"{good}\n{good}\n{line}\n")
        with pytest.raises(DpokitError) as error:
            read_metrics(path)  # the file itself works as well as its folder
        assert str(error.value) == f"{path}:3: {message}"
    path.write_text(f"{good}\n")
    assert read_metrics(tmp_path) == [json.loads(good)]


def test_missing_or_empty_runs_are_errors_naming_them(tmp_path, mpl):
    missing = tmp_path / "nope"
    with pytest.raises(DpokitError) as error:
        read_metrics(missing)
    assert str(error.value) == f"{missing}: run directory not found"
    with pytest.raises(DpokitError) as error:
        read_metrics(tmp_path)
    assert str(error.value) == f"{tmp_path}: no metrics.jsonl in it (is it a dpokit output_dir?)"
    good = make_run(tmp_path / "good", 1.0)
    empty = write_run(tmp_path / "empty", [])
    with pytest.raises(DpokitError) as error:
        plot_runs([good, empty], tmp_path / "curves.png")
    assert str(error.value) == f"{empty}: metrics.jsonl has no records"
    bad = write_run(tmp_path / "bad", [{**train_record(1, 1.0), "acc": "high"}])
    with pytest.raises(DpokitError) as error:
        plot_runs([bad], tmp_path / "curves.png")
    assert str(error.value) == f"{bad / 'metrics.jsonl'}:1: 'acc' must be a number, got 'high'"
    assert not (tmp_path / "curves.png").exists()


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", 1.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(DpokitError) as error:
        plot_runs([run], tmp_path / "curves.png")
    assert str(error.value) == MISSING_MATPLOTLIB == "dpokit plot needs matplotlib: pip install 'dpokit[plot]'"
    assert not (tmp_path / "curves.png").exists()


def dpokit_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dpokit.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.subprocess
def test_cli_plots_two_runs(tmp_path, mpl):
    make_run(tmp_path / "A", 1.0)
    make_run(tmp_path / "B", 2.0, datasets=("helpful", "harmless"))
    result = dpokit_cli("plot", "A", "B", "-o", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote out.png: 7 panels ({', '.join(DEFAULT_TITLES)}) for 2 run(s)\n"
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")

    result = dpokit_cli(
        "plot", "A", "B", "--labels", "base", "--labels", "tuned", "--metrics", "loss,acc", cwd=tmp_path
    )
    expected = "unknown metric 'acc'; choose from loss, accuracy, reward_margin, rewards, lr, grad_norm, tokens_per_s"
    assert result.returncode == 2 and result.stderr.startswith(f"dpokit: error: {expected}, sft_loss,"), result.stderr
    result = dpokit_cli("plot", "A", "B", "--labels", "base,tuned", "--metrics", "loss,accuracy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "wrote curves.png: 2 panels (loss, accuracy) for 2 run(s)\n"
    result = dpokit_cli("plot", "A", "missing", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "dpokit: error: missing: run directory not found\n")


@pytest.mark.subprocess
def test_plots_the_metrics_of_a_real_tiny_run(tmp_path, mpl):
    out = tmp_path / "run"
    args = ["run", "dpo_lora_single_device", "--config", "tiny", "max_steps=4", "eval_every=2", "device=cpu"]
    result = dpokit_cli(*args, f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out)
    splits = [record["split"] for record in records]
    assert splits.count("train") == 4 and splits.count("validation") == 3
    logged = {key for record in records for key in record}
    # The recipe may log more than the default panels' keys (mfu, peak memory...): those panels appear too.
    expected = [panel.title for panel in PANELS if logged & {key for series in panel.series for key in series}]
    assert expected[: len(DEFAULT_TITLES)] == DEFAULT_TITLES
    result = plot_runs([out], tmp_path / "curves.png")
    assert_drawn(result, expected)
    assert result.legend == ("run", "train", "validation")
