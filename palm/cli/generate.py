"""`python3 generate.py ...` / `palm generate ...`: sample text from a checkpoint.

    palm generate runs/wt103 --prompt "The meaning of life" --max_new_tokens 100 --top_p 0.9
    echo "def fib(n):" | palm generate runs/code/checkpoints/step_00002000 --temperature 0

Every prompt is conditioned on <eod> first, i.e. read as the start of a document, as in the
packed training data (PaLM §5). A single sequence is streamed as it is made. Several (more
prompts, or --num_samples > 1) decode as one left-padded batch and stream as labelled lines,
each printed once complete (at a newline, or wrapped at a space near 80 characters):

    [1.1] The meaning of life is a question that
    [1.2] The meaning of life, said the
    [1.1] has been asked by philosophers

`[p.s]` is prompt p, sample s: the lines starting `[1.2]` are that sample, in order.
`--compile` runs the one-token decoding step through torch.compile (fixed shapes: one graph
for every step; compilation takes seconds to a minute before the first token).
`--transposed_weights` (auto: on for CPU float32) decodes with copies of the weights in a faster
layout: (in, out) copies of the two wide ones for one sequence (~1.5x the tokens/s on CPU, ~75%
more weight memory while decoding) and over 64, oneDNN's packed layout of all of them for 2-64
(1.4-1.6x again, twice the weight memory; not for the serial-block ablation); `off` saves the
memory.
Exit status (every command alike): 0 done; 1 a runtime failure (one `error:` line naming the
file and the fix); 2 a bad command line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence

import torch

from palm.cli import TRANSPOSED_WEIGHTS, run
from palm.compiled_decoding import CompiledDecoder
from palm.errors import ConfigError, PalmError
from palm.flops import DTYPE_BYTES
from palm.kv_cache import WeightCopies, weight_copies
from palm.runs import WHICH, LoadedModel, load_model
from palm.sampling import TextStream, check_sampling, pad_left, stream


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        allow_abbrev=False,
        description="Sample text from a PaLM checkpoint with the key/value cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint folder (runs/NAME/checkpoints/step_N) or a "
        "run folder (runs/NAME: its --which checkpoint)",
    )
    p.add_argument(
        "--which",
        choices=WHICH,
        default="best",
        help="for a run folder: lowest validation loss, or highest step",
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer.model to use instead of the run's own"
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt text (repeat for a batch of prompts); '' = unconditional",
    )
    p.add_argument(
        "--prompt_file",
        action="append",
        default=None,
        help="file whose whole text is one prompt (repeatable); '-' = standard input",
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts line by line until end of input or 'exit'",
    )
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (argmax)")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest; 0 = all")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="same seed, same output")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop a sample at this string (repeatable; not printed)",
    )
    p.add_argument(
        "--ignore_eod",
        action="store_true",
        help="keep going after the end-of-document token instead of stopping",
    )
    p.add_argument("--echo", action="store_true", help="print each prompt before its sample")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the one-token decoding step (static-shape cache, as gpt-fast); "
        "an error, not a silent fallback, where it cannot compile",
    )
    p.add_argument(
        "--transposed_weights",
        choices=tuple(TRANSPOSED_WEIGHTS),
        default="auto",
        help="decode with copies of the weights in a faster layout ((in, out) for one "
        "sequence, oneDNN's packed one for 2-64): faster decoding matmuls, that much more "
        "memory; auto = on for CPU float32 only, where measured (benchmarks/RESULTS.md)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype", choices=tuple(DTYPE_BYTES), default="float32", help="weights and cache dtype"
    )
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    for name in args.prompt_file or []:
        if name == "-":
            prompts.append(sys.stdin.read())
            continue
        try:
            with open(name, encoding="utf-8") as handle:
                prompts.append(handle.read())
        except (OSError, UnicodeDecodeError) as error:
            raise PalmError(
                f"--prompt_file {name}: cannot read it ({error}); pass a UTF-8 text file"
            ) from None
    if not prompts:
        if sys.stdin.isatty():
            raise ConfigError(
                "no prompt: pass --prompt TEXT, --prompt_file FILE, --interactive, "
                "or pipe text on standard input"
            )
        prompts.append(sys.stdin.read())
    return prompts


WRAP = 80  # batched output: a line longer than this is cut at its last space
# Every boundary str.splitlines() knows: a stray \r or \x1c inside a sample must not start an
# unlabelled line.
LINE_BREAK = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


class LabelledLines:
    """One sample's text for interleaved batch output: each complete line (ended by a newline,
    or reaching WRAP characters, then cut at its last space) is written as `label text`."""

    def __init__(self, label: str, out) -> None:
        self.label, self.out, self.pending, self.lines = label, out, "", 0

    def write(self, text: str) -> None:
        self.pending += text
        while True:
            newline = LINE_BREAK.search(self.pending)
            if newline and newline.start() <= WRAP:
                line, self.pending = self.pending[: newline.start()], self.pending[newline.end() :]
            elif len(self.pending) > WRAP:
                space = self.pending.rfind(" ", 1, WRAP + 1)
                cut = space if space > 0 else WRAP
                line, self.pending = self.pending[:cut], self.pending[cut:].removeprefix(" ")
            else:
                return
            self.emit(line)

    def emit(self, line: str) -> None:
        self.out.write(f"{self.label} {line}\n" if line else f"{self.label}\n")
        self.out.flush()
        self.lines += 1

    def close(self) -> None:
        """The last, partial line (and at least one line per sample, even an empty one)."""
        if self.pending or not self.lines:
            self.emit(self.pending)
        self.pending = ""


def sample(
    loaded: LoadedModel,
    prompts: Sequence[str],
    args: argparse.Namespace,
    generator: torch.Generator,
    out=None,
    transposed: WeightCopies | bool | None = None,
    decoder: CompiledDecoder | None = None,
) -> list[str]:
    """Generate for every prompt x num_samples, streaming: a single sequence as raw text, a
    batch as labelled lines (LabelledLines). `transposed`: decoding's weight copies to reuse
    (interactive prompts share one set), else as --transposed_weights says; `decoder`: with
    --compile, the session's long-lived caches and compiled steps (palm.compiled_decoding)."""
    out = sys.stdout if out is None else out
    tokenizer, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    encoded = [[tokenizer.eod_id] + tokenizer.encode(p) for p in prompts]
    context = model.config.max_seq_len
    for text, ids in zip(prompts, encoded):
        if len(ids) + args.max_new_tokens > context:
            raise ConfigError(
                f"prompt {text[:30]!r}... is {len(ids)} tokens; with "
                f"--max_new_tokens {args.max_new_tokens} that exceeds the model's "
                f"context of {context}; shorten it or lower --max_new_tokens"
            )
    rows = [ids for ids in encoded for _ in range(args.num_samples)]
    tokens, mask = pad_left(rows, pad_id=max(tokenizer.pad_id, 0))
    streams = [TextStream(tokenizer, args.stop) for _ in rows]
    live = len(rows) == 1
    labelled = [
        LabelledLines(f"[{row // args.num_samples + 1}.{row % args.num_samples + 1}]", out)
        for row in range(len(rows))
    ]
    if live and args.echo:
        out.write(prompts[0])
    elif args.echo:
        for row, lines in enumerate(labelled):
            lines.write(prompts[row // args.num_samples])
    start, produced = time.perf_counter(), 0
    for token in stream(
        model,
        tokens.to(device),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eod_id=None if args.ignore_eod else tokenizer.eod_id,
        generator=generator,
        prompt_mask=mask.to(device),
        compile=args.compile,
        # Interactive prompts differ in length: one full-context cache keeps one graph.
        cache_len=context if args.compile and args.interactive else None,
        transposed_weights=(
            TRANSPOSED_WEIGHTS[args.transposed_weights] if transposed is None else transposed
        ),
        decoder=decoder,
    ):
        for row, text_stream in enumerate(streams):
            if not text_stream.done and not args.ignore_eod and token[row] == tokenizer.eod_id:
                text_stream.done = True
            piece = text_stream.push(int(token[row]))
            if live and piece:
                out.write(piece)
                out.flush()
            elif piece:
                labelled[row].write(piece)
        produced += len(rows)
        if all(s.done for s in streams):
            break
    texts = []
    for text_stream, lines in zip(streams, labelled):
        tail = text_stream.flush()
        if live:
            out.write(tail + "\n")
        else:
            lines.write(tail)
            lines.close()
        texts.append(text_stream.text)
    seconds = time.perf_counter() - start
    print(
        f"[{produced} tokens in {seconds:.2f} s, {produced / max(seconds, 1e-9):,.1f} tokens/s]",
        file=sys.stderr,
    )
    return texts


def interactive(loaded: LoadedModel, args: argparse.Namespace, generator: torch.Generator) -> None:
    print("interactive: one prompt per line; end with Ctrl-D or 'exit'", file=sys.stderr)
    # Decoding's weight copies made once for the session, not once per prompt: the kind that
    # serves num_samples rows (eager, or the compiled step's).
    wanted = TRANSPOSED_WEIGHTS[args.transposed_weights]
    shared = weight_copies(loaded.model, wanted, args.num_samples, compiled=args.compile)
    # --compile: one long-lived cache and step for every prompt (one context-long shape), so
    # on CUDA the step's graph is recorded once, not once per prompt.
    decoder = CompiledDecoder(loaded.model, shared) if args.compile else None
    while True:
        sys.stderr.write("> ")  # the prompt marker goes to stderr: stdout holds only samples
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":  # end of input or an explicit exit
            return
        line = line.rstrip("\n")
        try:
            prompt = [line.replace("\\n", "\n")]
            sample(loaded, prompt, args, generator, transposed=shared, decoder=decoder)
        except PalmError as error:  # e.g. a prompt too long: report it and keep the loop
            print(f"error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: generate_from_args(args))


def generate_from_args(args: argparse.Namespace) -> None:
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ConfigError("--max_new_tokens and --num_samples must be >= 1")
    if args.interactive and (args.prompt or args.prompt_file):
        raise ConfigError("--interactive reads prompts itself; drop --prompt/--prompt_file")
    prompts = [] if args.interactive else read_prompts(args)
    loaded = load_model(
        args.checkpoint, args.which, args.device, getattr(torch, args.dtype), args.tokenizer
    )
    print(f"loaded {loaded.path} (step {loaded.step})", file=sys.stderr)
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device).manual_seed(args.seed)
    if args.interactive:
        interactive(loaded, args, generator)
    else:
        sample(loaded, prompts, args, generator)


if __name__ == "__main__":
    sys.exit(main())
