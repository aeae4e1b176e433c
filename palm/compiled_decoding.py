"""Decoding's one-token step under torch.compile, as gpt-fast does it: the cache is preallocated,
the step's position is a tensor set in place, so every step has the same shapes and one graph
(no graph breaks, `fullgraph=True`) serves them all; on CUDA each step replays as a CUDA graph.
palm.sampling's `stream(compile=True)` decodes with it; `CompiledDecoder` keeps one cache and step
per shape across requests (an interactive session), as gpt-fast keeps its caches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from palm.errors import ConfigError
from palm.kv_cache import KVCache, WeightCopies, cache_dtype, weight_copies
from palm.model import PaLM


@functools.cache
def compiled_decode(cuda_graphs: bool = False) -> Callable[..., Tensor]:
    """PaLM.decode_static under torch.compile (lazy); `cuda_graphs`: mode "reduce-overhead"."""
    mode = "reduce-overhead" if cuda_graphs else None
    return torch.compile(PaLM.decode_static, fullgraph=True, dynamic=False, mode=mode)


class CompiledStep:
    """`decode_step` with the compiled static-shape forward: (B,) tokens -> (B, V) logits.

    The position is a (1,) tensor set in place before each call, and `cache.length` a
    Python number kept outside the graph, so no call changes a shape or a guarded value.
    On CUDA (`cuda_graphs`, torch >= 2.5) each step replays one CUDA graph: eager steps are
    launch-bound (benchmarks/RESULTS.md, "GPU check"). The cache is written inside the graph, so
    its tensors are static addresses, unguarded: a new cache re-records the graph, never
    recompiles it. (torch 2.4 would bake unguarded static tensors into the graph as constants,
    so a second request would decode against the first one's cache: no CUDA graphs there.)
    The logits a call returns are valid until the next call. The step follows `cache.length`,
    so a cache emptied and prefilled again (`KVCache.restart`) decodes on with the same step.
    """

    def __init__(self, model: PaLM, cache: KVCache, cuda_graphs: bool | None = None) -> None:
        self.model, self.cache, self.compiled = model, cache, False
        self.position = torch.tensor([cache.length], device=cache.keys[0].device)
        if cuda_graphs is None:
            cuda_graphs = self.position.is_cuda and TorchVersion(torch.__version__) >= "2.5"
        self.cuda_graphs = cuda_graphs
        if cuda_graphs:
            static = [*cache.keys, *cache.values, *(cache.rope or ()), cache.key_mask]
            if cache.transposed is not None:
                static += [*cache.transposed.in_proj, cache.transposed.output]
            for tensor in static:
                if tensor is not None:
                    torch._dynamo.mark_static_address(tensor, guard=False)

    def __call__(self, token: Tensor) -> Tensor:
        if self.cache.length >= self.cache.max_len:
            raise ConfigError(f"the cache's {self.cache.max_len} positions are all used")
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are used up
        self.position.fill_(self.cache.length)  # in place: the graph's input keeps its address
        try:
            step = compiled_decode(self.cuda_graphs)
            logits = step(self.model, token[:, None], self.position, self.cache)
        except Exception as error:  # compilation happens in the first call
            if self.compiled:
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"--compile: torch.compile cannot compile the decoding step here "
                f"({type(error).__name__}: {reason[:200]}); run without --compile"
            ) from None
        self.compiled = True
        self.cache.length += 1
        return logits


class CompiledDecoder:
    """Compiled decoding for many requests: one long-lived cache and `CompiledStep` per shape
    (rows, cache length, padded or not, cache dtype), emptied and prefilled again per request.

    On CUDA a CUDA graph reads and writes its cache at the addresses it was recorded with. A new
    cache per request has new addresses, so each request recorded the graph again, and torch
    (2.5 to about 2.12) stops using graphs after `cudagraph_unexpected_rerecord_limit` (128)
    re-records, silently. A long-lived cache is recorded once (gpt-fast keeps its caches in the
    model for the same reason). The stale keys a previous request left after `cache.length` are
    never attended: the static step masks positions after its own. The decoding weight copies
    (`transposed_weights`, as in `PaLM.new_cache`) are made once and shared by every cache,
    of the kind that pays for `batch_size` rows (None: any, the (in, out) copies); requests of
    other row counts decode right with them, at their speed.
    For one model state: made before training changes the weights, the copies would be stale.
    """

    def __init__(
        self,
        model: PaLM,
        transposed_weights: bool | WeightCopies | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.transposed = weight_copies(model, transposed_weights, batch_size, compiled=True)
        self.steps: dict[tuple, CompiledStep] = {}

    def step_for(self, rows: int, max_len: int, prompt_mask: Tensor | None) -> CompiledStep:
        """The step for `rows` prompts in a cache of `max_len`, its cache emptied and holding
        `prompt_mask` (rows, T) (None: no padding). Prefill `step.cache`, then call the step."""
        weight, padded = self.model.embedding.weight, prompt_mask is not None
        key = (rows, max_len, padded, cache_dtype(weight.dtype, weight.device.type))
        step = self.steps.get(key)
        if step is None:
            cache = self.model.new_cache(rows, max_len, transposed_weights=self.transposed)
            if padded:
                cache.key_mask = torch.ones(rows, max_len, dtype=torch.bool, device=weight.device)
            step = self.steps[key] = CompiledStep(self.model, cache)
        step.cache.restart(prompt_mask)
        return step
