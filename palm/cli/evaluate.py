"""`python3 evaluate.py ...` / `palm evaluate ...`: measure a checkpoint as papers do.

Three jobs, one per invocation:
    palm evaluate runs/wt103 --data data/wikitext-103 --split test       # perplexity of a split
    palm evaluate runs/wt103 --text notes.txt --stride 128                # ... of any text file
    palm evaluate runs/wt103 --data data/wikitext-103 --memorization      # PaLM §7
    palm evaluate runs/wt103 --tasks lambada_openai,hellaswag             # lm-evaluation-harness
`--json` prints one machine-readable JSON object on standard output instead of the table.
Exit status (every command alike): 0 done; 1 a runtime failure (one `error:` line naming the
file and the fix); 2 a bad command line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from palm.cli import run
from palm.data.corpus import DOCUMENT_MODES
from palm.errors import ConfigError, PalmError
from palm.runs import WHICH, LoadedModel, load_model

SPLIT_ALIASES = {"valid": "validation", "val": "validation"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        allow_abbrev=False,
        description="Perplexity (token, bits per byte, WikiText word-level), PaLM's "
        "memorization study, or lm-evaluation-harness tasks for a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (its --which one)")
    p.add_argument(
        "--which",
        choices=WHICH,
        default="best",
        help="for a run folder: lowest validation loss, or highest step",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer.model instead of the run's own")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g = p.add_argument_group("perplexity")
    g.add_argument("--data", default=None, help="prepared dataset folder (has meta.json)")
    g.add_argument("--split", default="validation", help="validation | test | train")
    g.add_argument("--text", default=None, help="score this UTF-8 text file instead")
    g.add_argument(
        "--documents",
        default="file",
        choices=DOCUMENT_MODES[1:],
        help="--text: how the file is cut into documents (each scored alone)",
    )
    g.add_argument(
        "--context",
        type=int,
        default=0,
        help="window length in tokens; 0 = the model's max_seq_len",
    )
    g.add_argument(
        "--stride",
        type=int,
        default=0,
        help="window step in tokens (each token sees >= context - stride of "
        "history); 0 = context // 2",
    )
    g.add_argument(
        "--max_documents", type=int, default=0, help="score only the first N documents (0 = all)"
    )
    m = p.add_argument_group("memorization (PaLM §7)")
    m.add_argument(
        "--memorization",
        action="store_true",
        help="exact-match rate of greedy continuations of training spans",
    )
    m.add_argument("--spans", type=int, default=1000, help="spans sampled per split")
    m.add_argument("--prompt_tokens", type=int, default=50, help="span prompt length")
    m.add_argument("--continuation_tokens", type=int, default=50, help="tokens to match")
    m.add_argument(
        "--memorization_splits",
        default="train,validation",
        help="comma-separated splits; the held-out ones are the baseline",
    )
    m.add_argument("--seed", type=int, default=0, help="which spans are drawn")
    h = p.add_argument_group("lm-evaluation-harness (pip install lm-eval)")
    h.add_argument("--tasks", default=None, help="comma-separated lm-eval task names")
    h.add_argument("--include_path", default=None, help="folder of extra task YAML files")
    h.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per task")
    h.add_argument(
        "--limit",
        type=float,
        default=None,
        help="examples per task (a fraction if < 1), for quick checks",
    )
    return p


def run_perplexity(loaded: LoadedModel, args: argparse.Namespace) -> dict:
    from palm.perplexity import perplexity, split_source, text_source

    tok = loaded.tokenizer
    if args.text:
        docs, n_bytes, n_words = text_source(args.text, tok, args.documents, args.max_documents)
        source = args.text
    else:
        split = SPLIT_ALIASES.get(args.split, args.split)
        docs, n_bytes, n_words = split_source(args.data, split, tok, args.max_documents)
        source = f"{args.data}:{split}"
    context = args.context or loaded.model.config.max_seq_len
    stride = args.stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise ConfigError(f"--stride {stride} must be in [1, --context {context}]")
    result = perplexity(
        loaded.model,
        docs,
        n_bytes,
        n_words,
        tok.eod_id,
        context,
        stride,
        args.batch_size,
        progress=sys.stderr.isatty(),
        source=source,
    )
    out = result.to_dict()
    if not args.json:
        print(
            f"{source}: {result.n_documents:,} documents, {result.n_tokens:,} tokens, "
            f"{result.n_bytes:,} bytes, {result.n_words:,} words "
            f"(context {context}, stride {stride})"
        )
        print(
            f"  loss {out['loss']:.4f} nats/token   token perplexity {result.token_perplexity:.3f}"
        )
        print(f"  bits per byte {result.bits_per_byte:.4f}")
        print(
            f"  word perplexity {result.word_perplexity:.3f} (WikiText convention: "
            f"comparable with the literature on WikiText only)"
        )
    return out


def run_memorization(loaded: LoadedModel, args: argparse.Namespace) -> dict:
    from palm.memorization import memorization, split_tokens

    if args.spans < 1 or args.prompt_tokens < 1 or args.continuation_tokens < 1:
        raise ConfigError("--spans, --prompt_tokens and --continuation_tokens must be >= 1")
    results = {}
    for split in filter(None, args.memorization_splits.split(",")):
        split = SPLIT_ALIASES.get(split, split)
        tokens, pad_id, eod_id = split_tokens(args.data, split)
        result = memorization(
            loaded.model,
            tokens,
            split,
            args.spans,
            args.prompt_tokens,
            args.continuation_tokens,
            max(args.batch_size, 1),
            args.seed,
            pad_id,
            progress=sys.stderr.isatty(),
            eod_id=eod_id,
        )
        results[split] = result.to_dict()
        if not args.json:
            low, high = result.interval()
            print(
                f"{split}: {result.exact_matches}/{result.n_spans} spans memorized = "
                f"{result.exact_match_rate:.2%} (95% CI {low:.2%}-{high:.2%}); "
                f"token match {result.token_match_rate:.2%}"
            )
    return {"memorization": results}


def run_tasks(loaded: LoadedModel, args: argparse.Namespace) -> dict:
    try:
        from palm.lm_eval_adapter import evaluate_tasks
    except ImportError as error:
        raise PalmError(
            f"--tasks needs lm-evaluation-harness ({error}); "
            f"pip install 'palm-lm[eval]' (or pip install lm-eval)"
        ) from None
    tasks = [t for t in args.tasks.split(",") if t]
    results = evaluate_tasks(
        loaded,
        tasks,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
    )
    if not args.json:
        for task, metrics in results["results"].items():
            shown = ", ".join(
                f"{k} {v:.4f}"
                for k, v in metrics.items()
                if isinstance(v, float) and "stderr" not in k
            )
            print(f"{task}: {shown}")
    return {"results": results["results"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: evaluate_from_args(args))


def evaluate_from_args(args: argparse.Namespace) -> None:
    modes = [
        bool(args.tasks),
        args.memorization,
        bool(args.text) or (bool(args.data) and not args.memorization and not args.tasks),
    ]
    if sum(modes) != 1:
        raise ConfigError(
            "choose one job: --data DIR (perplexity), --text FILE, "
            "--memorization with --data DIR, or --tasks NAMES"
        )
    if args.memorization and not args.data:
        raise ConfigError("--memorization needs --data DIR (the prepared training data)")
    if args.text and args.data:
        raise ConfigError("--text and --data both name what to score; pass one")
    if args.batch_size < 1 or args.context < 0 or args.stride < 0 or args.max_documents < 0:
        raise ConfigError("--batch_size must be >= 1; --context, --stride, --max_documents >= 0")
    loaded = load_model(args.checkpoint, args.which, args.device, tokenizer=args.tokenizer)
    print(f"loaded {loaded.path} (step {loaded.step})", file=sys.stderr)
    job = run_tasks if args.tasks else run_memorization if args.memorization else run_perplexity
    out = job(loaded, args)
    if args.json:
        out = {"checkpoint": str(loaded.path), "step": loaded.step, **out}
        print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
