"""Training curves of one or more runs as a PNG: `palm plot RUN [RUN ...]` (and
`runs/NAME/curves.png` at the end of a training run).

Each run's metrics.jsonl gives a curve against steps and one against tokens; validation points
are marked, loss spikes and rollbacks (PaLM §5.1) drawn as vertical lines, and each run is named
in the legend by the config keys in which the runs differ (e.g. `model.parallel_block=False`), so
an ablation reads at a glance. matplotlib is optional (the `plot` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from palm.errors import ConfigError, PalmError

METRICS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PalmError(f"{path}: not found; is {run_dir} a run folder (train first)?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the others still plot
    if not records:
        raise PalmError(f"{path}: holds no metrics yet; train first")
    return records


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run named by the config values in which the runs differ (its folder name when it is
    alone, or when nothing differs)."""
    configs = []
    for run in run_dirs:
        path = Path(run) / "config.yaml"
        values = yaml.safe_load(path.read_text()) if path.is_file() else {}
        flat = {
            f"{section}.{key}": value
            for section, fields in (values or {}).items()
            if isinstance(fields, dict)
            for key, value in fields.items()
            if f"{section}.{key}" not in ("train.name", "train.runs_dir")
        }
        configs.append(flat)
    keys = sorted({k for c in configs for k in c})
    labels = []
    for run, config in zip(run_dirs, configs):
        # A key names a run when its value there differs from the most common one (the grid's
        # baseline), so an ablation reads "model.parallel_block=False", not every setting.
        parts = []
        for key in keys:
            values = [repr(c.get(key)) for c in configs]
            counts = sorted((values.count(v) for v in set(values)), reverse=True)
            if len(counts) == 1:
                continue  # the same everywhere
            usual = max(set(values), key=values.count) if counts[0] > counts[1] else None
            if repr(config.get(key)) != usual:
                parts.append(f"{key}={config.get(key)}")
        labels.append(", ".join(parts) if parts and len(run_dirs) > 1 else Path(run).name)
    return labels


def plot_runs(run_dirs: list[Path], out: Path, metric: str = "loss") -> Path:
    """Write the curves of `metric` for `run_dirs` to `out` (PNG); returns `out`."""
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {METRICS}, got {metric!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PalmError(
            "plotting needs matplotlib: pip install 'palm-lm[plot]' (or pip install matplotlib)"
        ) from None
    runs = [(Path(r), read_metrics(Path(r))) for r in run_dirs]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.25 * len(runs)), layout="constrained")
    for (_, records), label in zip(runs, run_labels([r for r, _ in runs])):
        kind = "eval" if metric == "val_loss" else "train"
        points = [r for r in records if r.get("kind") == kind and metric in r]
        tokens = _tokens_by_step(records)
        by_step, by_tokens = (lambda r: r["step"]), (lambda r, t=tokens: t(r["step"]))
        for axis, x_of in ((axes[0], by_step), (axes[1], by_tokens)):
            xs, ys = [x_of(r) for r in points], [float(r[metric]) for r in points]
            style = {"marker": "o", "markersize": 3} if kind == "eval" else {}
            (line,) = axis.plot(xs, ys, label=label, linewidth=1.2, **style)
            if metric == "loss":  # validation points on the training curve
                evals = [r for r in records if r.get("kind") == "eval"]
                axis.plot(
                    [x_of(r) for r in evals],
                    [r["val_loss"] for r in evals],
                    "o",
                    color=line.get_color(),
                    markersize=4,
                    markerfacecolor="none",
                )
            for event in (r for r in records if r.get("event") == "loss_spike"):
                axis.axvline(x_of(event), color=line.get_color(), linestyle=":", linewidth=1)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("tokens")
    for axis in axes:
        axis.set_ylabel(metric.replace("_", " "))
        axis.grid(alpha=0.3)
    if metric in ("loss", "val_loss"):
        axes[0].set_title("o = validation loss, dotted = loss-spike rollback", fontsize=9)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _tokens_by_step(records: list[dict]):
    """step -> tokens seen, from the train records (interpolated between logged steps)."""
    known = sorted((r["step"], r["tokens"]) for r in records if r.get("kind") == "train")

    def tokens(step: int) -> float:
        if not known:
            return float(step)
        for (s0, t0), (s1, t1) in zip(known, known[1:]):
            if s0 <= step <= s1:
                return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
        return known[-1][1] * step / max(known[-1][0], 1)

    return tokens
