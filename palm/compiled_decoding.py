"""Decoding's one-token step under torch.compile, as gpt-fast does it: the cache is preallocated,
the step's position is a tensor advanced in place, so every step has the same shapes and one graph
(no graph breaks, `fullgraph=True`) serves them all; on CUDA each step replays as a CUDA graph.
palm.sampling's `stream(compile=True)` decodes with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from palm.errors import ConfigError
from palm.kv_cache import KVCache
from palm.model import PaLM


@functools.cache
def compiled_decode(cuda_graphs: bool = False) -> Callable[..., Tensor]:
    """PaLM.decode_static under torch.compile (lazy); `cuda_graphs`: mode "reduce-overhead"."""
    mode = "reduce-overhead" if cuda_graphs else None
    return torch.compile(PaLM.decode_static, fullgraph=True, dynamic=False, mode=mode)


class CompiledStep:
    """`decode_step` with the compiled static-shape forward: (B,) tokens -> (B, V) logits.

    The position is a (1,) tensor advanced in place after each call, and `cache.length` a
    Python number kept outside the graph, so no call changes a shape or a guarded value.
    On CUDA (`cuda_graphs`, torch >= 2.5) each step replays one CUDA graph: eager steps are
    launch-bound (benchmarks/RESULTS.md, "GPU check"). The cache is written inside the graph, so
    its tensors are static addresses, unguarded: a new cache re-records the graph, never
    recompiles it. (torch 2.4 would bake unguarded static tensors into the graph as constants,
    so a second request would decode against the first one's cache: no CUDA graphs there.)
    The logits a call returns are valid until the next call.
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
        self.position += 1
        return logits
