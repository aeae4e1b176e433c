"""PaLM as a model of EleutherAI's lm-evaluation-harness (`pip install lm-eval`, optional).

Serves the harness' three request types with our own scoring code:
- loglikelihood(context, continuation): one forward over context + continuation (the context
  left-truncated to the model's window), the continuation's log-probability and whether greedy
  decoding would have produced it;
- loglikelihood_rolling(text): the text's total log-likelihood, conditioned on <eod> and scored
  in disjoint windows of the full context, each token once (palm.perplexity);
- generate_until(context, {until, max_gen_toks, temperature, ...}): greedy (or sampled) decoding
  with the key/value cache, cut at the first stop string or <eod>.

Use from Python (`lm_eval.simple_evaluate(model=PaLMLM(checkpoint=...), tasks=[...])`), from
`palm evaluate RUN --tasks ...`, or with lm-eval's own command line through this module, which
registers the name "palm" first (lm-eval 0.4 has no plugin discovery for models):
    python -m palm.lm_eval_adapter --model palm --model_args checkpoint=runs/NAME --tasks ...
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from palm.errors import ConfigError
from palm.kv_cache import WeightCopies, weight_copies
from palm.loss import IGNORE_INDEX, token_scores
from palm.perplexity import score_documents
from palm.runs import LoadedModel, load_model
from palm.sampling import TextStream, pad_left, stream


@register_model("palm")
class PaLMLM(TemplateLM):
    """A PaLM checkpoint (or an already loaded model) behind lm-eval's LM interface."""

    def __init__(
        self,
        checkpoint: str | None = None,
        which: str = "best",
        device: str = "cpu",
        batch_size: int | str = 8,
        tokenizer: str | None = None,
        loaded: LoadedModel | None = None,
        **harness_options: Any,
    ) -> None:
        super().__init__()
        if loaded is None:
            if checkpoint is None:
                raise ConfigError("PaLMLM needs checkpoint=DIR (a run or checkpoint folder)")
            loaded = load_model(checkpoint, which, device or "cpu", tokenizer=tokenizer)
        if str(batch_size).startswith("auto"):
            batch_size = 8  # no automatic batch search: windows are short, 8 is safe
        self.loaded = loaded
        self.model, self.tok = loaded.model.eval(), loaded.tokenizer
        self.batch_size = int(batch_size)
        self._device = next(self.model.parameters()).device
        self.max_length = self.model.config.max_seq_len

    # --- tokenization (TemplateLM's contract) ---

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id  # documents start after <eod>, as in the packed data (PaLM §5)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **_) -> str:
        return self.tok.decode(tokens)

    # --- loglikelihood ---

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        prepared = []
        for index, (_, context, continuation) in enumerate(requests):
            if not context or context[0] != self.eot_token_id:
                # Condition on a document start, as generation and rolling scoring do.
                context = [self.eot_token_id, *context]
            if not 0 < len(continuation) <= self.max_length:
                raise ConfigError(
                    f"a continuation of {len(continuation)} tokens cannot be "
                    f"scored in a context of {self.max_length}"
                )
            # The last max_length tokens feed the model; the final token is only a target.
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            prepared.append((index, whole, len(continuation)))
        prepared.sort(key=lambda item: -len(item[1]))  # similar lengths share a batch
        bar = tqdm(total=len(prepared), disable=disable_tqdm, desc="loglikelihood")
        for first in range(0, len(prepared), self.batch_size):
            chunk = prepared[first : first + self.batch_size]
            width = max(len(whole) for _, whole, _ in chunk) - 1
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (_, whole, _) in enumerate(chunk):
                inputs[row, : len(whole) - 1] = torch.tensor(whole[:-1])  # right padding
            targets = torch.full_like(inputs, IGNORE_INDEX)  # only continuations are scored
            for row, (_, whole, n_cont) in enumerate(chunk):
                n = len(whole) - 1
                targets[row, n - n_cont : n] = torch.tensor(whole[-n_cont:])
            # The chunked output projection: per-token scores, no (B, T, V) logits.
            hidden = self.model.features(inputs.to(self._device))
            nll, is_greedy = token_scores(
                hidden, self.model.output_weight, targets.to(self._device)
            )
            for row, (index, whole, n_cont) in enumerate(chunk):
                n = len(whole) - 1
                score = -float(nll[row, n - n_cont : n].sum())
                greedy = bool(is_greedy[row, n - n_cont : n].all())
                results[index] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[index][0], (score, greedy))
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(request.args[0]) for request in requests]
        scores = score_documents(
            self.model,
            docs,
            self.eot_token_id,
            self.max_length,
            self.max_length,
            self.batch_size,
            progress=not disable_tqdm,
        )
        out = []
        for request, (nll, _) in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), -nll)
            out.append(-nll)
        return out

    # --- generation ---

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same options decode together
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        # Decoding's weight copies, once for all (the kind for batches of up to batch_size).
        transposed = weight_copies(self.model, batch_size=self.batch_size)
        for indices in groups.values():
            options = requests[indices[0]].args[1]
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first : first + self.batch_size]
                contexts = [requests[i].args[0] for i in chunk]
                texts = self._generate(contexts, dict(options), transposed)
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    @torch.no_grad()
    def _generate(
        self, contexts: list[str], options: dict, transposed: WeightCopies | bool | None = None
    ) -> list[str]:
        until = options.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(options.pop("max_gen_toks", 256))
        do_sample = bool(options.pop("do_sample", False))
        temperature = float(options.pop("temperature", 0.0)) if do_sample else 0.0
        top_k, top_p = int(options.pop("top_k", 0) or 0), float(options.pop("top_p", 1.0) or 1.0)
        seed = int(options.pop("seed", 0) or 0)
        # Room for the new tokens: keep the end of a long context, as lm-eval's HF model does.
        max_new = min(max_new, self.max_length - 1)
        keep = self.max_length - max_new
        prompts = [([self.eot_token_id] + self.tok_encode(c))[-keep:] for c in contexts]
        tokens, mask = pad_left(prompts, pad_id=max(self.tok.pad_id, 0))
        streams = [TextStream(self.tok, until) for _ in prompts]
        generator = torch.Generator(self._device).manual_seed(seed)
        for token in stream(
            self.model,
            tokens.to(self._device),
            max_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eod_id=self.eot_token_id,
            generator=generator,
            prompt_mask=mask.to(self._device),
            transposed_weights=transposed,
        ):
            for row, text_stream in enumerate(streams):
                if int(token[row]) == self.eot_token_id:
                    text_stream.done = True
                text_stream.push(int(token[row]))
            if all(s.done for s in streams):
                break
        return [s.text for s in streams]


def evaluate_tasks(
    loaded: LoadedModel,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
) -> dict:
    """Run lm-eval tasks on a loaded model; returns lm-eval's results dictionary."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Scanning lm-eval's ~15k built-in task files takes tens of seconds: skip it when the
    # tasks asked for are all in --include_path.
    manager = (
        TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    )
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task(s) {unknown}; list them with `lm_eval ls tasks` "
            f"or pass --include_path DIR with their YAML"
        )
    results = simple_evaluate(
        model=PaLMLM(loaded=loaded, batch_size=batch_size),
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    return results


def main() -> None:
    """lm-eval's own command line with the "palm" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
