"""palm plot (and benchmarks/ablations.py, which uses it): curves of real runs as a PNG that
matplotlib reads back, runs named by the config keys in which they differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib", reason="pip install 'palm-lm[plot]'")

from palm.cli import main as palm  # noqa: E402
from palm.plot import run_labels  # noqa: E402
from palm.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, make_dataset, tiny_config):
    root = tmp_path_factory.mktemp("plot")
    data = make_dataset(root / "data")
    a = train(tiny_config(data, root / "runs")).run_dir
    b = train(tiny_config(data, root / "runs", "train.name=u", "model.tie_embeddings=false"))
    return a, b.run_dir


def test_two_runs_make_a_png_named_by_their_difference(two_runs, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "compare.png"
    assert palm(["plot", *map(str, two_runs), "--out", str(out)]) == 0
    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width > 800 and height > 300
    assert (image[..., :3] < 0.5).any() and (image[..., :3] > 0.9).any()  # lines on a background
    # Two runs: each is named by what differs (there is no majority to leave out).
    assert run_labels(list(two_runs)) == ["model.tie_embeddings=True", "model.tie_embeddings=False"]
    assert palm(["plot", str(two_runs[0]), "--metric", "val_loss", "--out", str(out)]) == 0


def test_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert palm(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "metrics.jsonl: not found" in err and "train first" in err


@pytest.mark.slow
def test_the_ablation_grid_in_small(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "data")
    done = subprocess.run(
        [sys.executable, "benchmarks/ablations.py", "--quick", "--data", str(data)]
        + ["--runs", str(tmp_path / "runs"), "--json", str(tmp_path / "table.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "table.json").read_text())
    assert [r["variant"] for r in rows] == [
        "palm", "serial block", "multi-head", "GELU", "untied", "no z-loss", "AdamW",
    ]  # fmt: skip
    assert all(r["val_loss"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert rows[4]["parameters"] > rows[0]["parameters"]  # the untied head
    assert (tmp_path / "runs" / "ablations.png").stat().st_size > 10_000


def test_train_py_leaves_its_curves_in_the_run_folder(tmp_path, make_dataset, capsys):
    from palm.cli.train import main as train_main

    data = make_dataset(tmp_path / "data")
    code = train_main(
        [f"data.path={data}", f"train.runs_dir={tmp_path / 'runs'}", "train.max_steps=3"]
        + ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.head_dim=16"]
        + ["train.sample_tokens=0"]
    )
    assert code == 0
    assert "curves: " in capsys.readouterr().out
    assert (tmp_path / "runs" / "default" / "curves.png").stat().st_size > 10_000
