"""Sampling and generate.py: cached == uncached == compiled, padded batches == single prompts,
filters against brute force, seeds, streaming (one sequence and batches), stop strings,
run-folder resolution, clear errors."""

from __future__ import annotations

import copy
import io
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import palm.compiled_decoding
import palm.cpu_kernels
import palm.kv_cache
import palm.sampling
from palm.cli.generate import WRAP, LabelledLines, main
from palm.errors import ConfigError
from palm.kv_cache import PackedWeights, TransposedWeights, weight_copies, weight_copies_pay
from palm.model import PaLM
from palm.profiling import available_memory_bytes
from palm.runs import load_model, resolve_checkpoint
from palm.sampling import TextStream, generate, pad_left, top_k_filter, top_p_filter
from palm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepare_dataset, write_run) -> Path:
    root = tmp_path_factory.mktemp("gen")
    return write_run(root, prepare_dataset(root))


@pytest.fixture(scope="session")
def small_model(tiny_model_config):
    """`small_model(seed=0, **overrides)`: a tiny PaLM (vocab 97), in eval mode."""

    def make(seed: int = 0, **overrides) -> PaLM:
        torch.manual_seed(seed)
        config = tiny_model_config(vocab_size=97, max_seq_len=96)
        config = type(config)(**{**config.to_dict(), **overrides})
        return PaLM(config).eval()

    return make


@pytest.mark.parametrize("overrides", [{}, {"multi_query": False, "parallel_block": False}])
def test_greedy_with_cache_equals_greedy_without(overrides, small_model):
    model = small_model(**overrides)
    prompt = torch.randint(0, 97, (3, 7))
    cached = generate(model, prompt, 40, temperature=0.0)
    uncached = generate(model, prompt, 40, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 40)
    assert torch.equal(cached, uncached)


def test_under_bf16_autocast_the_cache_is_bf16_and_gives_the_float32_caches_logits(small_model):
    """Keys and values are made in bf16 under autocast: a float32 cache held the same values at
    twice the bytes, cast back whole at every step. The logits are those of a float32 cache."""
    model = small_model()
    prompt, token = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 1))
    logits = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (None, torch.float32):
            cache = model.new_cache(2, 16, dtype=dtype)
            logits[dtype] = (model(prompt, cache), model(token, cache), cache.keys[0].dtype)
    assert logits[None][2] == torch.bfloat16 and logits[torch.float32][2] == torch.float32
    for got, want in zip(logits[None][:2], logits[torch.float32][:2], strict=True):
        assert torch.equal(got, want)
    assert model.new_cache(2, 16).keys[0].dtype == torch.float32  # autocast off: the weights'
    with torch.device("meta"):
        meta_model = PaLM(model.config)
    assert meta_model.new_cache(2, 16).keys[0].device.type == "meta"


class Ops(TorchDispatchMode):
    """The names of the ops a block of code dispatches."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def check_cached_decoding(model, reference, cache, batch: int, onednn: bool) -> None:
    """A 3-token prompt then 3 steps of `batch` rows through `cache`: every step's logits are
    the float64 reference's; `onednn`: whether the steps run oneDNN's linear kernel."""
    sequence = torch.randint(0, 97, (batch, 3))
    with torch.no_grad():
        logits = model(sequence, cache)[:, -1]
        for _ in range(3):
            expected = reference(sequence)[:, -1]
            torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-4)
            token = torch.randint(0, 97, (batch,))
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            with Ops() as ops:
                logits = model(token[:, None], cache)[:, -1]
            assert ("_linear_pointwise" in ops.names) is onednn, (batch, sorted(set(ops.names)))


@pytest.mark.parametrize(
    "overrides", [{}, {"multi_query": False, "parallel_block": False}, {"tie_embeddings": False}]
)
def test_transposed_weights_decode_the_float64_logits(overrides, small_model):
    """Decoding through the cache's (in, out) copies of in_proj and the output projection gives
    a float64 full forward's logits at every step, and the native layout's greedy tokens."""
    model = small_model(5, **overrides)
    reference = copy.deepcopy(model).double()
    prompt = torch.randint(0, 97, (2, 6))
    cache = model.new_cache(2, 20, transposed_weights=palm.kv_cache.transposed_weights(model))
    assert len(cache.transposed.in_proj) == model.config.n_layers and cache.packed is None
    output_t = cache.transposed.output
    assert output_t.shape == (model.config.d_model, 97) and output_t.is_contiguous()
    with torch.no_grad():
        logits, sequence = model(prompt, cache)[:, -1], prompt
        for _ in range(8):
            expected = reference(sequence)[:, -1]
            torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-4)
            token = expected.argmax(-1)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            logits = model(token[:, None], cache)[:, -1]
    native = generate(model, prompt, 30, temperature=0.0, transposed_weights=False)
    for kind in (True, palm.kv_cache.transposed_weights(model)):  # True: packed if packable
        copies = generate(model, prompt, 30, temperature=0.0, transposed_weights=kind)
        assert torch.equal(copies, native)


@pytest.mark.parametrize("shape, rows", [((1000, 37), 512), ((97, 32), 8), ((5, 3), 512)])
def test_transposed_copies_are_made_in_row_blocks_exactly(shape, rows):
    """The (in, out) copy, made a block of rows at a time (a last block shorter), is w.T."""
    weight = torch.randn(shape)
    copy_ = palm.kv_cache.transposed(weight, rows)
    assert copy_.is_contiguous() and torch.equal(copy_, weight.t())


def test_weight_copies_only_where_measured_to_pay(small_model):
    """On by default for CPU float32 (where they were measured faster); off for other dtypes and
    for a replaced output projection (tensor parallelism); an explicit False is honoured."""
    model = small_model()
    assert weight_copies_pay(model, 1) is TransposedWeights
    assert model.new_cache(1, 8).transposed is not None
    assert model.new_cache(1, 8, transposed_weights=False).transposed is None
    assert weight_copies_pay(small_model().to(torch.bfloat16)) is None
    model.output_logits = lambda x: x  # as palm.parallel replaces it
    assert weight_copies_pay(model, 1) is None and model.new_cache(1, 8).transposed is None


@pytest.mark.skipif(not palm.cpu_kernels.onednn_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("overrides", [{}, {"multi_query": False, "parallel_block": False}])
def test_onednn_decodes_2_to_64_sequences_to_the_float64_logits(overrides, small_model):
    """Which copies a cache holds, and which kernel its steps run (palm.cpu_kernels), by batch:
    one sequence, the (in, out) copies; 2-64, oneDNN's packed copies of every weight (the
    parallel block); the serial ablation has none, so its 4-64 go through oneDNN from
    nn.Linear's layout; over 64, the (in, out) copies; a server (any batch), the packed ones;
    compiled steps the packed ones for 2-64 (parallel block), none for one sequence, else the
    (in, out) copies. Every step's logits are a float64 forward's."""
    model = small_model(8, **overrides)
    reference = copy.deepcopy(model).double()
    parallel = model.config.parallel_block
    many = PackedWeights if parallel else None  # 4-64 rows
    two = PackedWeights if parallel else TransposedWeights
    cases = [(1, TransposedWeights, False), (2, two, parallel), (4, many, True), (64, many, True),
             (65, TransposedWeights, False)]  # fmt: skip
    for batch, kind, onednn in cases:
        assert weight_copies_pay(model, batch) is kind, batch
        cache = model.new_cache(batch, 16)
        assert cache.transposed is None or kind is TransposedWeights
        assert (cache.packed is not None) is (kind is PackedWeights)
        check_cached_decoding(model, reference, cache, batch, onednn)
    # With autograd on (fine-tuning through a cache), oneDNN's op has no gradient: the
    # module ops run, and the weights get their gradients.
    with Ops() as ops:
        model(torch.randint(0, 97, (4, 3)), model.new_cache(4, 16)).square().sum().backward()
    assert "_linear_pointwise" not in ops.names
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert weight_copies_pay(model) is (PackedWeights if parallel else TransposedWeights)
    assert weight_copies_pay(model, compiled=True) is TransposedWeights  # a decoder, any batch
    assert weight_copies_pay(model, 1, compiled=True) is None  # Inductor's one-row reduction
    assert weight_copies_pay(model, 8, compiled=True) is (two if parallel else TransposedWeights)
    if parallel:  # the packed copies serve one-row steps too, but are not made for them
        packed = palm.kv_cache.packed_weights(model)
        assert all(w.is_mkldnn for w in [*packed.in_proj, *packed.mlp_out, packed.output])
        check_cached_decoding(model, reference, model.new_cache(1, 16, None, None, packed), 1, True)
        assert weight_copies(model, packed, compiled=True) is packed
        # Under CPU autocast the linears run in its dtype: no oneDNN float32 product.
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Ops() as ops:
            logits = model(torch.randint(0, 97, (4, 2)), model.new_cache(4, 16))
        assert "_linear_pointwise" not in ops.names and logits.dtype == torch.bfloat16


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}])
def test_one_sequence_multiplies_in_per_thread_pieces(overrides, small_model, monkeypatch):
    """One sequence decoded eagerly (parallel block, CPU float32) holds its (in, out) copies
    as per-thread column pieces, and every product of a step runs as one batched matmul over
    pieces (the out projections' of nn.Linear's own layout): the logits are a float64
    forward's at every step, the greedy tokens nn.Linear's. Batches of more, compiled steps
    and the serial block keep whole copies."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # the tests run on one thread
    model = small_model(8, vocab_size=96, **overrides)
    reference = copy.deepcopy(model).double()
    copies = palm.kv_cache.transposed_weights(model, 1)
    d, rows = model.config.d_model, model.blocks[0].in_proj.weight.shape[0]
    assert copies.one_row and copies.in_proj[0].shape == (4, d, rows // 4)
    assert copies.output.shape == (4, d, 24)
    for piece, weight in ((copies.in_proj[1], model.blocks[1].in_proj.weight),
                          (copies.output, model.output_weight)):  # fmt: skip
        assert piece.is_contiguous() and torch.equal(piece.transpose(0, 1).flatten(1), weight.t())
    cache = model.new_cache(1, 16)
    assert cache.one_row and cache.packed is None
    check_cached_decoding(model, reference, cache, 1, onednn=False)
    with torch.no_grad(), Ops() as ops:
        model(torch.randint(0, 96, (1, 1)), cache)
    # in_proj, attn_out, mlp_out a layer, and the output: each one bmm, no other product
    assert ops.names.count("bmm") == 3 * model.config.n_layers + 1 and "mm" not in ops.names
    prompt = torch.randint(0, 96, (1, 5))
    native = generate(model, prompt, 12, temperature=0.0, transposed_weights=False)
    assert torch.equal(generate(model, prompt, 12, temperature=0.0), native)
    transposed = palm.kv_cache.transposed_weights
    serial = small_model(8, parallel_block=False, multi_query=False)
    for whole in (transposed(model, 2), transposed(model, 1, compiled=True), transposed(serial, 1)):
        assert not whole.one_row and whole.in_proj[0].dim() == 2 and whole.output.dim() == 2
    # With autograd on (fine-tuning through a cache), the detached copies are not used: every
    # weight gets its gradient.
    model(prompt, model.new_cache(1, 16)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(palm.errors.ConfigError, match="96 rows do not split into 5 pieces"):
        palm.kv_cache.transposed(model.output_weight, pieces=5)
    # Pieces only of equal width: as many threads as divide the rows, else fewer.
    assert [palm.cpu_kernels.one_row_pieces(n, 4) for n in (96, 97, 10)] == [4, 1, 2]
    assert torch.equal(palm.kv_cache.transposed(model.output_weight, 8, pieces=3)[1],
                       model.output_weight[32:64].t())  # fmt: skip


def test_transposed_weights_never_take_more_than_half_the_available_memory(
    small_model, monkeypatch, tmp_path
):
    model = small_model()
    copies = 4 * (sum(b.in_proj.weight.numel() for b in model.blocks) + 97 * 32)
    for available, expected in ((2 * copies, True), (2 * copies - 8, False), (None, True)):
        monkeypatch.setattr(palm.kv_cache, "available_memory_bytes", lambda a=available: a)
        assert (weight_copies_pay(model, 1) is TransposedWeights) is expected, available
    if palm.kv_cache.packable(model):  # the packed copies count every block weight
        out = 4 * sum(b.attn_out.weight.numel() + b.mlp_out.weight.numel() for b in model.blocks)
        monkeypatch.setattr(palm.kv_cache, "available_memory_bytes", lambda: 2 * (copies + out))
        assert weight_copies_pay(model, 8) is PackedWeights
        monkeypatch.setattr(palm.kv_cache, "available_memory_bytes", lambda: 2 * copies)
        assert weight_copies_pay(model, 8) is None  # oneDNN unpacked, no copies, at 4-64
        assert weight_copies_pay(model, 2) is TransposedWeights  # the set that fits
        assert weight_copies_pay(model) is TransposedWeights
    # The reader: Linux's MemAvailable in KiB, at least the free pages; None without the file.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:     200 kB\nMemAvailable:   512 kB\n")
    assert available_memory_bytes(meminfo) == 512 * 1024
    assert available_memory_bytes(tmp_path / "missing") is None
    if Path("/proc/meminfo").exists():
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert available_memory_bytes() >= 0.5 * free


@pytest.mark.parametrize("overrides", [{}, {"multi_query": False, "parallel_block": False}])
def test_static_shape_step_equals_the_cached_forward(overrides, small_model):
    """decode_static (what --compile compiles): the whole-cache, position-as-tensor step gives
    the logits of the ordinary cached forward, with and without left padding."""
    model = small_model(4, **overrides)
    tokens, mask = pad_left([[5, 6, 7, 8, 9], [3, 4]])
    caches = []
    for _ in range(2):
        cache = model.new_cache(2, 12)
        cache.key_mask = torch.ones(2, 12, dtype=torch.bool)
        cache.key_mask[:, :5] = mask
        model(tokens, cache)
        caches.append(cache)
    token = torch.tensor([11, 12])
    with torch.no_grad():
        for step in range(4):
            position = torch.tensor([5 + step])
            static = model.decode_static(token[:, None], position, caches[0])
            caches[0].length += 1
            eager = model(token[:, None], caches[1])[:, -1]
            torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)
            token = eager.argmax(-1)


@pytest.mark.slow  # torch.compile of even a tiny model takes ~10 s on 2 CPU cores
def test_compiled_greedy_decoding_equals_eager(small_model):
    from torch._dynamo.utils import counters

    model = small_model(5)
    prompt = torch.randint(0, 97, (4, 7))  # 4 rows: eager and compiled steps take packed copies
    eager = generate(model, prompt, 30, temperature=0.0)
    torch._dynamo.reset()
    counters.clear()
    with torch.profiler.profile() as profile:
        assert torch.equal(generate(model, prompt, 30, temperature=0.0, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all 29 steps: no recompiles
    if palm.cpu_kernels.onednn_available():  # the packed products, as palm's opaque custom op
        calls = [e.name for e in profile.events()].count("palm::onednn_packed_linear")
        assert calls >= 29 * (3 * model.config.n_layers + 1), calls  # every step, all weights
    # A fixed cache length (as the interactive CLI uses): other prompt lengths, same graph.
    short = prompt[:, 2:]
    expected = generate(model, short, 30, temperature=0.0)
    assert torch.equal(generate(model, short, 30, temperature=0.0, compile=True, cache_len=37),
                       expected)  # fmt: skip
    tokens, mask = pad_left([[5, 6, 7, 8], [3], [1, 2]])
    padded = generate(model, tokens, 20, temperature=0.0, prompt_mask=mask)
    compiled = generate(model, tokens, 20, temperature=0.0, prompt_mask=mask, compile=True)
    assert torch.equal(compiled, padded)


@pytest.mark.parametrize("overrides", [{}, {"multi_query": False, "parallel_block": False}])
def test_compiled_one_sequence_steps_copy_nothing_and_call_no_matmul(overrides, small_model):
    """A compiled step of one sequence multiplies by views of nn.Linear's own layout as one-row
    batched matmuls, which Inductor lowers to its own reduction (palm.cpu_kernels.
    pieces_product): no weight copies, no matmul kernel called, and eager's greedy tokens."""
    model = small_model(9, **overrides)
    prompt = torch.randint(0, 97, (1, 6))
    eager = generate(model, prompt, 12, temperature=0.0)
    assert weight_copies_pay(model, 1, compiled=True) is None
    assert palm.compiled_decoding.CompiledDecoder(model, batch_size=1).transposed is False
    torch._dynamo.reset()
    with torch.no_grad():
        cache, logits = palm.sampling.prefill(model, prompt, None, 18, transposed_weights=False)
        step = palm.compiled_decoding.CompiledStep(model, cache)
        tokens = [logits.argmax(-1)]
        logits = step(tokens[-1])  # compiles
        with torch.profiler.profile() as profile:
            for _ in range(11):
                tokens.append(logits.argmax(-1))
                logits = step(tokens[-1])
    assert torch.equal(torch.stack(tokens, dim=1), eager)
    names = {e.name for e in profile.events()}
    products = {"aten::mm", "aten::bmm", "aten::addmm", "aten::linear", "aten::matmul"}
    assert not names & products and not any("linear" in name for name in names), sorted(names)


@pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < "2.5",
    reason="torch 2.4 bakes unguarded static tensors into the graph (CUDA graphs are off there)",
)
def test_unguarded_static_caches_serve_each_new_request_without_recompiling(small_model):
    """CUDA graphs need the cache's tensors as static addresses, unguarded (CompiledStep). Here
    that marking runs on the CPU (Inductor skips the graphs there): a second request with another
    prompt and a new cache must decode its own tokens (no first cache baked in as a constant,
    torch 2.4's behaviour), with no new graph."""
    from torch._dynamo.utils import counters

    model = small_model(6)
    prompts = [torch.randint(0, 97, (2, 6)) for _ in range(2)]
    graphs = None
    for prompt in prompts:
        expected = generate(model, prompt, 12, temperature=0.0)
        with torch.no_grad():
            cache, logits = palm.sampling.prefill(model, prompt, None, 18)
            step = palm.compiled_decoding.CompiledStep(model, cache, cuda_graphs=True)
            tokens = []
            for _ in range(12):
                tokens.append(logits.argmax(-1))
                logits = step(tokens[-1])
        assert torch.equal(torch.stack(tokens, dim=1), expected)
        assert graphs in (None, counters["stats"]["unique_graphs"])
        graphs = counters["stats"]["unique_graphs"]


@pytest.mark.slow  # compiles the decoding step (~10 s on 2 CPU cores)
def test_a_compiled_decoder_serves_every_request_from_one_long_lived_cache(small_model):
    """CompiledDecoder (the interactive CLI's --compile): requests of other prompts and lengths
    decode in one cache at unchanged addresses (what keeps a recorded CUDA graph valid) with
    one compiled graph; the stale keys a longer earlier request left are never attended."""
    from torch._dynamo.utils import counters

    model = small_model(7)
    decoder = palm.compiled_decoding.CompiledDecoder(model, batch_size=2)  # packed, on CPU
    addresses, graphs = set(), set()
    for length in (14, 3, 9):  # the longest first: its keys stay behind in the cache
        prompt = torch.randint(0, 97, (2, length))
        expected = generate(model, prompt, 12, temperature=0.0)
        got = generate(model, prompt, 12, temperature=0.0, compile=True, cache_len=30,
                       decoder=decoder)  # fmt: skip
        assert torch.equal(got, expected)
        (step,) = decoder.steps.values()
        addresses.add((step.cache.keys[0].data_ptr(), step.cache.values[-1].data_ptr()))
        graphs.add(counters["stats"]["unique_graphs"])
    assert len(addresses) == 1 and len(graphs) == 1
    # Padded: the key mask too. The first mask's padding (row 0, positions 0-3) lies where the
    # second request decodes: restart must clear it. Fed given tokens (greedy ones of a tiny
    # model repeat, and would hide a masked key), the logits must be eager's.
    for prompts in ([[1], [2, 3, 4, 5, 6]], [[5, 6], [3]]):
        tokens, mask = pad_left(prompts)
        step = decoder.step_for(2, 30, mask)
        with torch.no_grad():
            _, got = palm.sampling.prefill(model, tokens, mask, 30, cache=step.cache)
            cache, expected = palm.sampling.prefill(model, tokens, mask, 30)
            for token in torch.randint(0, 97, (10, 2)):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
                got = step(token).clone()
                expected = palm.sampling.decode_step(model, token, cache)
    assert len(decoder.steps) == 2  # one unpadded and one padded cache of two rows
    with pytest.raises(ConfigError, match="compile=True"):
        generate(model, tokens, 3, decoder=decoder)
    with pytest.raises(ConfigError, match="transposed_weights to CompiledDecoder"):
        wanted = not decoder.transposed
        generate(model, tokens, 3, compile=True, decoder=decoder, transposed_weights=wanted)
    with pytest.raises(ConfigError, match="key mask"):
        next(iter(decoder.steps.values())).cache.restart(mask)  # the unpadded one


def test_compile_that_cannot_be_honoured_is_a_clear_error(small_model, monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler found\nlong traceback")

    monkeypatch.setattr(palm.compiled_decoding, "compiled_decode", lambda *args: broken)
    with pytest.raises(ConfigError, match=r"--compile: .*RuntimeError: no C\+\+ compiler found\)"):
        generate(small_model(), torch.randint(0, 97, (1, 4)), 5, compile=True)
    with pytest.raises(ConfigError, match="use_cache"):
        generate(small_model(), torch.randint(0, 97, (1, 4)), 5, compile=True, use_cache=False)
    with pytest.raises(ConfigError, match="cache_len 6"):
        generate(small_model(), torch.randint(0, 97, (1, 4)), 5, cache_len=6)


def test_decoding_feeds_one_token_per_step(small_model):
    """Flat cost per token: after the prompt every forward sees one position (the cache)."""
    model = small_model()
    widths = []
    original = model.features  # every forward of the model goes through it
    model.features = lambda tokens, cache=None: (
        widths.append(tokens.shape[1]) or original(tokens, cache)
    )
    generate(model, torch.randint(0, 97, (2, 9)), 20, temperature=0.0)
    assert widths == [9] + [1] * 19


def test_eager_steps_run_in_inference_mode_and_yield_tokens_a_model_can_train_on(small_model):
    """The eager loop runs under torch.inference_mode (the faster mode, benchmarks/RESULTS.md),
    compiled steps and a model compiled in place under no_grad; what it yields are plain
    tensors: a caller may feed them to a training step, whose embedding saves them for backward
    (an inference tensor there is an error)."""
    model = small_model()
    modes = []
    original = model.features
    model.features = lambda tokens, cache=None: (
        modes.append(torch.is_inference_mode_enabled()) or original(tokens, cache)
    )
    prompt = torch.randint(0, 97, (2, 5))
    tokens = list(palm.sampling.stream(model, prompt, 4, temperature=0.0))
    assert modes == [True] * 4 and not torch.is_inference_mode_enabled()
    del model.features
    assert not any(t.is_inference() for t in tokens)
    inputs, targets = tokens[0][:, None], tokens[1][:, None]  # views, as a caller would take
    model(inputs, targets=targets).loss.backward()
    assert model.embedding.weight.grad is not None
    serves = palm.sampling.inference_mode_serves
    assert serves(model, compile=False) and not serves(model, compile=True)
    model.compile()  # in place, as train.compile does (compiles at the first call: none here)
    assert not serves(model, compile=False)


def test_left_padded_batch_matches_each_prompt_alone(small_model):
    model = small_model(1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42, 43]]
    tokens, mask = pad_left(prompts)
    # Logits at real positions equal those of the prompt alone (RoPE is relative).
    cache = model.new_cache(3, tokens.shape[1])
    cache.key_mask = mask
    batched_logits = model(tokens, cache)
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt]))[0]
        torch.testing.assert_close(batched_logits[row, -len(prompt) :], alone, atol=1e-5, rtol=1e-5)
    for use_cache in (True, False):
        batched = generate(
            model, tokens, 25, temperature=0.0, prompt_mask=mask, use_cache=use_cache
        )
        for row, prompt in enumerate(prompts):
            alone = generate(model, torch.tensor([prompt]), 25, temperature=0.0)
            assert torch.equal(batched[row], alone[0]), (use_cache, row)


def brute_force_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-set of nucleus sampling by its definition: add tokens by falling probability until
    their mass reaches p."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for row in range(logits.shape[0]):
        probs = torch.softmax(logits[row].double(), -1)
        mass = 0.0
        for index in torch.argsort(probs, descending=True).tolist():
            keep[row, index] = True
            mass += float(probs[index])
            if mass >= p:
                break
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_filter_matches_brute_force(p):
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    kept = top_p_filter(logits, p) > float("-inf")
    assert torch.equal(kept, brute_force_top_p(logits, p))


def test_top_k_filter_keeps_exactly_the_k_largest():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    kept = top_k_filter(logits, 5) > float("-inf")
    expected = torch.zeros_like(kept)
    expected.scatter_(1, logits.topk(5, dim=-1).indices, True)
    assert torch.equal(kept, expected)


def test_same_seed_same_samples_and_top_k_1_is_greedy(small_model):
    model = small_model(2)
    prompt = torch.randint(0, 97, (2, 5))

    def draw(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 30, temperature=1.0, generator=g, **kw)

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    assert torch.equal(draw(3, top_k=1), generate(model, prompt, 30, temperature=0.0))


def test_eod_stops_rows_and_pads_them_with_eod(small_model):
    model = small_model(3)
    prompt = torch.randint(0, 97, (1, 4))
    first = int(generate(model, prompt, 1, temperature=0.0)[0, 0])
    out = generate(model, prompt, 10, temperature=0.0, eod_id=first)
    assert out.tolist() == [[first]]  # stopped at once: the only row finished


def test_text_stream_holds_back_a_stop_string_split_across_tokens(run):
    tok = Tokenizer.load(run / "tokenizer.model")
    ids = tok.encode("the world and the people")
    stream = TextStream(tok, ["and the"])
    printed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert printed == "the world " and stream.done


def test_run_folder_resolves_to_best_or_latest(run):
    assert resolve_checkpoint(run, "best").name == "step_00000200"  # val_loss 1.5
    assert resolve_checkpoint(run, "latest").name == "step_00000300"
    step = run / "checkpoints" / "step_00000100"
    assert resolve_checkpoint(step) == step


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_greedy_output_is_the_models_greedy_decoding(run, capsys):
    rc, out, _ = cli(
        capsys, run, "--prompt", "the world", "--max_new_tokens", 12, "--temperature", 0
    )
    assert rc == 0
    loaded = load_model(run)
    tok = loaded.tokenizer
    prompt = torch.tensor([[tok.eod_id] + tok.encode("the world")])
    new = generate(loaded.model, prompt, 12, temperature=0.0, eod_id=tok.eod_id)[0].tolist()
    expected = tok.decode(new[: new.index(tok.eod_id)] if tok.eod_id in new else new)
    assert out == expected + "\n"


def test_cli_transposed_weights_flag_reaches_the_cache(run, capsys, monkeypatch):
    """--transposed_weights on/off/auto: honoured by the cache, and the same greedy text."""
    made = []
    new_cache = PaLM.new_cache

    def spy(self, *args, **kwargs):
        cache = new_cache(self, *args, **kwargs)
        made.append(cache.transposed is not None or cache.packed is not None)
        return cache

    monkeypatch.setattr(PaLM, "new_cache", spy)
    argv = (run, "--prompt", "the world", "--max_new_tokens", 12, "--temperature", 0)
    texts = []
    for choice, expected in (("off", False), ("on", True), ("auto", True)):  # auto: CPU float32
        made.clear()
        rc, out, _ = cli(capsys, *argv, "--transposed_weights", choice)
        assert rc == 0 and made == [expected], (choice, made)
        texts.append(out)
    assert texts[0] == texts[1] == texts[2]


def test_cli_seed_batches_stdin_stop_and_samples(run, capsys, monkeypatch):
    args = (
        run,
        "--prompt",
        "the",
        "--prompt",
        "a long prompt of many words",
        "--seed",
        3,
        "--num_samples",
        2,
        "--max_new_tokens",
        15,
        "--top_p",
        0.9,
        "--top_k",
        50,
    )
    rc, first, _ = cli(capsys, *args)
    rc2, second, _ = cli(capsys, *args)
    assert rc == rc2 == 0 and first == second
    labels = {line.split(" ", 1)[0] for line in first.splitlines()}
    assert labels == {"[1.1]", "[1.2]", "[2.1]", "[2.2]"}
    monkeypatch.setattr(sys, "stdin", io.StringIO("the world"))
    rc, piped, _ = cli(capsys, run, "--max_new_tokens", 12, "--temperature", 0)
    rc2, direct, _ = cli(
        capsys, run, "--prompt", "the world", "--max_new_tokens", 12, "--temperature", 0
    )
    assert rc == rc2 == 0 and piped == direct
    stop = direct.strip()[3:6]
    if stop:
        rc, cut, _ = cli(
            capsys,
            run,
            "--prompt",
            "the world",
            "--max_new_tokens",
            12,
            "--temperature",
            0,
            "--stop",
            stop,
        )
        assert cut == direct[: direct.index(stop)] + "\n"


@pytest.mark.slow  # compiles the decoding step of the run's model
def test_cli_compile_gives_the_same_greedy_text(run, capsys):
    argv = (run, "--prompt", "the world", "--prompt", "a", "--max_new_tokens", 12)
    rc, eager, _ = cli(capsys, *argv, "--temperature", 0)
    rc2, compiled, _ = cli(capsys, *argv, "--temperature", 0, "--compile")
    assert rc == rc2 == 0 and compiled == eager and "[2.1]" in eager


def test_cli_streams_a_single_sequence(run):
    loaded = load_model(run)
    from palm.cli.generate import build_parser, sample

    args = build_parser().parse_args([str(run), "--max_new_tokens", "20", "--ignore_eod"])
    writes = []

    class Out(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    sample(loaded, ["the"], args, torch.Generator().manual_seed(0), out=Out())
    assert len([w for w in writes if w]) > 3  # pieces appear as they are made


def test_labelled_lines_break_at_newlines_and_wrap_at_spaces():
    out = io.StringIO()
    lines = LabelledLines("[1.2]", out)
    for piece in ["Hello", " wor", "ld\nsecond", " line", " " + "x" * (WRAP + 5)]:
        lines.write(piece)
    head = ["[1.2] Hello world", "[1.2] second line", "[1.2] " + "x" * WRAP]  # no space: cut
    assert out.getvalue().splitlines() == head  # only complete lines so far
    lines.close()
    assert out.getvalue().splitlines() == [*head, "[1.2] xxxxx"]
    empty = io.StringIO()
    LabelledLines("[2.1]", empty).close()
    assert empty.getvalue() == "[2.1]\n"  # every sample shows up, even an empty one


def test_cli_streams_every_sequence_of_a_batch(run, monkeypatch):
    """Batched samples stream too: each row's lines appear while decoding goes on, labelled,
    and one sample's lines joined give its text."""
    import palm.cli.generate as command

    loaded = load_model(run)
    argv = [str(run), "--max_new_tokens", "60", "--ignore_eod", "--num_samples", "2"]
    args = command.build_parser().parse_args(argv)
    out, steps, original = io.StringIO(), [], command.stream

    def counting_stream(*a, **kw):
        for token in original(*a, **kw):
            steps.append(len(out.getvalue()))  # what was printed before this token
            yield token

    monkeypatch.setattr(command, "stream", counting_stream)
    texts = command.sample(loaded, ["the", "a"], args, torch.Generator().manual_seed(0), out=out)
    assert steps[-1] > 0  # something was printed before the last token was made
    for row, label in enumerate(["[1.1]", "[1.2]", "[2.1]", "[2.2]"]):
        mine = [line[len(label) + 1 :] for line in out.getvalue().splitlines()
                if line.startswith(label)]  # fmt: skip
        assert " ".join(mine).split() == texts[row].split()


def test_cli_interactive_loop(run, capsys, monkeypatch, weight_copies_made):
    made = weight_copies_made  # one set for the whole session, not one per prompt
    monkeypatch.setattr(sys, "stdin", io.StringIO("the world\nthe world\nexit\n"))
    rc, out, err = cli(capsys, run, "--interactive", "--max_new_tokens", 5, "--temperature", 0)
    assert len(made) == 1 and isinstance(made[0], TransposedWeights)  # one row per prompt
    rc2, direct, _ = cli(
        capsys, run, "--prompt", "the world", "--max_new_tokens", 5, "--temperature", 0
    )
    assert rc == rc2 == 0 and "interactive" in err and out == direct * 2


def test_cli_errors_are_one_clear_line(run, capsys, tmp_path):
    rc, _, err = cli(capsys, tmp_path / "nope", "--prompt", "x")
    assert rc == 1 and "nope" in err and "no such checkpoint" in err
    rc, _, err = cli(capsys, run, "--prompt", "the " * 400, "--max_new_tokens", 10)
    assert rc == 2 and "exceeds the model's context of 320" in err  # a bad command line: 2
    rc, _, err = cli(capsys, run, "--prompt", "x", "--top_p", 1.5)
    assert rc == 2 and "top_p" in err
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--prompt", "x", "--typical_p", "0.9"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --typical_p" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    rc, _, err = cli(capsys, empty, "--prompt", "x")
    assert rc == 1 and "no complete checkpoint" in err
