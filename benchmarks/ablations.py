"""The paper's architecture and recipe ablations (PaLM §2, §5), rerun at small scale.

    python benchmarks/ablations.py                  # the default grid: ~35 minutes on 2 cores
    python benchmarks/ablations.py --quick          # a smoke run: ~3 minutes
    python benchmarks/ablations.py --data data/NAME --seeds 3 --steps 2000

Trains PaLM's default and one variant per switch (serial block, multi-head attention, GELU,
untied embeddings, no z-loss, AdamW) on the same data for the same steps and seeds, then writes
a table (final validation loss with its spread over seeds, training tokens/s, cached decoding
tokens/s, parameters) next to the paper's claim for each switch, and a plot of the curves
(`palm plot`). Each run is an ordinary run folder under --runs; a finished one is reused, so an
interrupted grid continues where it stopped. The data: a prepared dataset (--data), or WikiText-2
from ../shared/data, prepared once under --runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from palm.checkpoint import list_checkpoints
from palm.config import load_config
from palm.errors import PalmError
from palm.runs import load_model
from palm.sampling import generate

# (name, overrides, what the paper says)
VARIANTS = [
    ("palm", [], "PaLM: parallel block, multi-query, SwiGLU, tied embeddings, z-loss, Adafactor"),
    (
        "serial block",
        ["model.parallel_block=false"],
        "§2: parallel is ~15% faster to train at scale; small quality loss at 8B, none at 62B",
    ),
    (
        "multi-head",
        ["model.multi_query=false"],
        "§2: multi-query is neutral in quality and training speed, much faster to decode",
    ),
    ("GELU", ["model.activation=gelu"], "§2: SwiGLU significantly increases quality"),
    ("untied", ["model.tie_embeddings=false"], "§2: shared input/output embeddings"),
    ("no z-loss", ["train.z_loss=0"], "§5: z-loss (1e-4) for stability"),
    (
        "AdamW",
        ["optim.name=adamw", "optim.weight_decay=0.1", "optim.lr=0.003"],
        "§5: Adafactor without factorisation, PaLM's recipe",
    ),
]


def prepare_wikitext2(runs: Path) -> Path:
    """WikiText-2 (../shared/data) prepared once under `runs` (vocabulary 8192, BPE)."""
    from palm.cli.download import main as download

    source = ROOT.parent / "shared" / "data" / "wikitext-2"
    if not (source / "wiki.train.tokens").is_file():
        raise SystemExit(f"{source}: WikiText-2 not found; pass --data DIR (a prepared dataset)")
    folder = runs / "data"
    code = download(
        ["--path", str(folder), "--dataset", str(source), "--vocab_size", "8192"]
        + ["--model_type", "bpe", "--seq_len", "256", "--batch_size", "16"]
    )
    if code:
        raise SystemExit(code)
    return folder / "wikitext-2"


def run_variant(name: str, extra: list[str], seed: int, args, data: Path) -> Path:
    overrides = [
        f"data.path={data}",
        f"train.runs_dir={args.runs}",
        f"train.name={name.replace(' ', '-')}-seed{seed}",
        f"model.preset={args.preset}",
        f"train.max_steps={args.steps}",
        f"train.seed={seed}",
        f"data.seed={1234 + seed}",
        "optim.schedule=cosine",
        f"optim.warmup_steps={max(1, args.steps // 20)}",
        f"train.eval_every={max(1, args.steps // 5)}",
        f"train.checkpoint_every={args.steps}",
        "train.log_every=5",
        "train.sample_tokens=0",
        *extra,
    ]
    config = load_config(None, overrides)
    run_dir = Path(args.runs) / config.train.name
    finished = list_checkpoints(run_dir / "checkpoints")
    if finished and int(finished[-1].name[5:]) >= args.steps:
        print(f"ablations: {run_dir} is finished (reused)")
        return run_dir
    from palm.trainer import train

    train(config)
    return run_dir


def decode_speed(run_dir: Path, tokens: int = 64) -> float:
    loaded = load_model(run_dir, "latest", require_tokenizer=False)
    prompt = torch.zeros(1, 8, dtype=torch.long)
    generate(loaded.model, prompt, 4, temperature=0.0)
    started = time.perf_counter()
    generate(loaded.model, prompt, tokens, temperature=0.0)
    return tokens / (time.perf_counter() - started)


def summary(run_dir: Path) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if r.get("kind") == "eval"]
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train"][1:]
    return {
        "val_loss": evals[-1] if evals else float("nan"),
        "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: WikiText-2)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablations")
    parser.add_argument("--preset", default="palm-tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant, for the spread")
    parser.add_argument("--quick", action="store_true", help="palm-tiny, 30 steps, one seed")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.steps, args.seeds = "palm-tiny", 30, 1
    args.runs.mkdir(parents=True, exist_ok=True)
    data = args.data or prepare_wikitext2(args.runs)
    rows, curves = [], []
    started = time.perf_counter()
    for name, extra, claim in VARIANTS:
        dirs = [run_variant(name, extra, seed, args, data) for seed in range(args.seeds)]
        curves.append(dirs[0])
        figures = [summary(d) for d in dirs]
        losses = [f["val_loss"] for f in figures]
        model = load_model(dirs[0], "latest", require_tokenizer=False).model
        rows.append(
            {
                "variant": name,
                "val_loss": statistics.mean(losses),
                "val_loss_spread": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "train_tokens_per_s": statistics.median(f["tokens_per_s"] for f in figures),
                "decode_tokens_per_s": decode_speed(dirs[0]),
                "parameters": model.num_parameters(),
                "paper": claim,
            }
        )
    seconds = time.perf_counter() - started
    base = rows[0]
    lines = [
        f"{args.preset}, {args.steps} steps, {args.seeds} seed(s), data {data} ({seconds:.0f} s)",
        "",
        "| variant | val loss | vs PaLM | train tok/s | decode tok/s | params | the paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f" ± {r['val_loss_spread']:.3f}" if args.seeds > 1 else ""
        delta = r["val_loss"] - base["val_loss"]
        lines.append(
            f"| {r['variant']} | {r['val_loss']:.3f}{spread} | {delta:+.3f}"
            f" | {r['train_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f} "
            f"| {r['parameters'] / 1e6:.2f}M | {r['paper']} |"
        )
    table = "\n".join(lines)
    print(table)
    try:
        from palm.plot import plot_runs

        print(f"plot: {plot_runs(curves, args.runs / 'ablations.png', 'loss')}")
    except PalmError as error:  # no matplotlib: the table alone
        print(f"plot: skipped ({error})")
    (args.runs / "ablations.md").write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
