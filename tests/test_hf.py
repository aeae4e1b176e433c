"""Hugging Face transformers: `palm export --to hf` writes a CohereForCausalLM folder that
transformers loads with no custom code, and palm reads back (palm.hf, palm.hf_tokenizer).

Checked against transformers itself (offline: it only reads folders written here): logits in
float32, greedy decoding with the KV cache, tokenizer ids, bit-exact round trips both ways, the
refusals, the command line, train.init_from, and lm-eval's own `hf` model against our adapter.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from palm.config import ModelConfig
from palm.errors import ConversionError, DataError
from palm.hf import hf_config, write_folder
from palm.hf_tokenizer import tokenizer_files
from palm.interop import from_hf, to_hf_state_dict
from palm.model import PaLM
from palm.sampling import generate
from palm.tokenizer import Tokenizer, TokenizerTrainConfig, train_sentencepiece

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

# Tabs, runs of spaces, trailing spaces, blank lines, digits, accents, CJK, Greek, Cyrillic,
# emoji with a modifier, and reserved piece names written out as text.
TEXT = (
    "The café's naïve über-straße   costs 12345.67 €\t(tab)\t\ttwo tabs\n"
    "    def f(x):\n        return x  # trailing   \n\n"
    "日本語のテキスト、中文文本。 Ελληνικά. Русский текст. 😀🙂👍🏽 emoji\n"
    "Zahlen: 0 1 22 333 4444; <b>bold</b>, <eod> <pad> <unk> <0x41> written out.\n"
    "\t mixed \t whitespace  \n  leading and trailing  "
)
IDS = {"bos": None, "eos": 1, "pad": 0}


def tiny(**fields) -> ModelConfig:
    base = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=2, head_dim=16, max_seq_len=96)
    return ModelConfig(**{**base, **fields})


CONFIGS = {
    "palm": tiny(),
    "heads_x_head_dim_ne_d_model": tiny(d_model=48, n_heads=3, head_dim=32),  # as PaLM 540B
    "multi_head_untied": tiny(multi_query=False, tie_embeddings=False, ffn_mult=2.5),
    "unscaled_other_rope_eps": tiny(scale_logits=False, rope_base=500.0, norm_eps=1e-6),
}


def random_model(config: ModelConfig, seed: int = 0) -> PaLM:
    """Random weights everywhere, LayerNorm gains too (they start at 1)."""
    torch.manual_seed(seed)
    model = PaLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def load_hf(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "CohereForCausalLM" and model.dtype == torch.float32
    return model.eval()


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_gives_our_logits_and_the_round_trip_is_bit_exact(name, tmp_path):
    model = random_model(CONFIGS[name])
    written = write_folder(model, tmp_path / "hf", {}, IDS)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(written)
    hf = load_hf(tmp_path / "hf")
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    # ours -> folder -> ours, ours -> transformers object -> ours, and transformers -> ours -> HF
    assert_same_state(from_hf(tmp_path / "hf").state_dict(), model.state_dict())
    assert_same_state(from_hf(hf).state_dict(), model.state_dict())
    hf_state = dict(hf.state_dict())
    if model.config.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # the tied view of embed_tokens
    assert_same_state(to_hf_state_dict(from_hf(hf)), hf_state)


def test_a_model_born_in_transformers_converts_both_ways_bit_exactly():
    values = hf_config(CONFIGS["heads_x_head_dim_ne_d_model"], IDS)
    fields = {k: v for k, v in values.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = transformers.CohereForCausalLM(transformers.CohereConfig(**fields)).eval()
    ours = from_hf(hf)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert_same_state(to_hf_state_dict(ours), state)
    tokens = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["palm", "heads_x_head_dim_ne_d_model"])
def test_greedy_generate_gives_generate_pys_tokens(name, tmp_path):
    model = random_model(CONFIGS[name], seed=3)
    write_folder(model, tmp_path / "hf", {}, IDS)
    hf = load_hf(tmp_path / "hf")
    prompt = torch.tensor([[1, 5, 17, 42, 8, 9], [1, 60, 3, 3, 77, 12]])  # <eod> first
    ours = generate(model, prompt, 32, temperature=0.0, eod_id=1)  # our KV cache, greedy
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32)
    theirs = out[:, prompt.shape[1] :]
    assert theirs.shape == (2, 32) and ours.shape == (2, 32)
    # After eos transformers pads with pad_token_id where ours repeats <eod>.
    finished = (theirs == 1).cumsum(1) > 0
    assert torch.equal(ours, theirs.masked_fill(finished, 1))
    assert not finished[:, :8].any()  # not a trivial all-<eod> answer


def test_large_models_are_sharded_with_an_index(tmp_path):
    model = random_model(CONFIGS["palm"])
    written = write_folder(model, tmp_path / "hf", {}, IDS, max_shard_bytes=12_000)
    shards = [n for n in written if n.startswith("model-")]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and "model.safetensors" not in written
    assert sorted(set(index["weight_map"].values())) == shards
    hf = load_hf(tmp_path / "hf")
    tokens = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    assert_same_state(from_hf(tmp_path / "hf").state_dict(), model.state_dict())


REFUSED = {
    "xPos": dict(xpos_scale_base=512.0),
    "no final LayerNorm": dict(final_norm=False),
    "serial block": dict(parallel_block=False),
    "gelu": dict(activation="gelu"),
}


@pytest.mark.parametrize("reason", REFUSED)
def test_what_cohere_cannot_compute_is_refused_in_one_line(reason, tmp_path):
    model = PaLM(tiny(**REFUSED[reason]))
    with pytest.raises(ConversionError, match=reason) as error:
        write_folder(model, tmp_path / "hf", {}, IDS)
    assert "\n" not in str(error.value) and not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "edit, reason",
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"use_qk_norm": True}, "use_qk_norm"),
        ({"logit_scale": 0.0625}, "logit_scale"),
        ({"num_key_value_heads": 2}, "grouped-query"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"intermediate_size": 0}, "no PaLM has this shape"),
        ({"num_hidden_layers": 3}, "lack model.layers.2"),
    ],
)
def test_transformers_folders_palm_cannot_compute_are_refused(edit, reason, tmp_path):
    write_folder(random_model(tiny(n_heads=4, head_dim=8)), tmp_path / "hf", {}, IDS)
    config = tmp_path / "hf" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    with pytest.raises(ConversionError, match=reason):
        from_hf(tmp_path / "hf")


def test_an_existing_folder_that_is_no_export_is_never_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not a transformers folder"):
        write_folder(random_model(CONFIGS["palm"]), tmp_path / "out", {}, IDS)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    write_folder(random_model(CONFIGS["palm"]), tmp_path / "hf", {}, IDS)  # an earlier export
    write_folder(random_model(CONFIGS["palm"], seed=1), tmp_path / "hf", {}, IDS)
    assert not list(tmp_path.glob(".*"))  # no temporary or trash folder left behind


# ---------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def sentencepiece_models() -> dict[str, Tokenizer]:
    """palm's lossless SentencePiece, unigram and BPE, on text with every kind of character."""
    import random

    rng = random.Random(0)
    words = "the of and café naïve straße 日本語 中文 テスト Ελληνικά текст 😀 <b> </b> def".split()
    words += [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(200)
    ]
    lines = []
    for _ in range(2000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        indent = rng.choice(["", "    ", "        ", "\t", "  \t"])
        lines.append(indent + line + rng.choice(["", " ", "   "]) + f" {rng.randint(0, 9999)}")
    return {
        kind: Tokenizer(train_sentencepiece(lines, TokenizerTrainConfig(500, model_type=kind)))
        for kind in ("unigram", "bpe")
    }


def hf_tokenizer(tokenizer: Tokenizer, folder):
    files, ids = tokenizer_files(tokenizer, 256)
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return transformers.AutoTokenizer.from_pretrained(folder), files, ids


def check_same_ids(tokenizer: Tokenizer, hf, text: str = TEXT) -> None:
    ids = tokenizer.encode(text)
    assert hf(text, add_special_tokens=False).input_ids == ids
    assert hf.decode(ids) == text


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_sentencepiece_tokenizers_give_palms_ids(kind, sentencepiece_models, tmp_path):
    tokenizer = sentencepiece_models[kind]
    hf, files, ids = hf_tokenizer(tokenizer, tmp_path / "tok")
    check_same_ids(tokenizer, hf)
    assert files["tokenizer.model"] == tokenizer.model_bytes
    assert hf.eos_token_id == hf.bos_token_id == tokenizer.eod_id == ids["eos"] == 1
    assert hf.pad_token_id == tokenizer.pad_id == ids["pad"] == 0
    # <eod> comes first, as every prompt of generate.py and the lm-eval adapter has it.
    assert hf(TEXT).input_ids == [tokenizer.eod_id, *tokenizer.encode(TEXT)]
    # Each line alone, too: no state carries over between calls.
    for line in TEXT.splitlines(keepends=True):
        assert hf(line, add_special_tokens=False).input_ids == tokenizer.encode(line), line


def test_the_gpt_neox_tokenizer_json_is_used_as_it_is(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    neox = HFTokenizer(models.BPE())
    neox.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    neox.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    neox.train_from_iterator([TEXT] * 5, trainer)
    tokenizer = Tokenizer(neox.to_str().encode())
    hf, files, ids = hf_tokenizer(tokenizer, tmp_path / "tok")
    assert files["tokenizer.json"] == tokenizer.model_bytes and "tokenizer.model" not in files
    assert ids == {"bos": None, "eos": 0, "pad": 1}
    assert hf.eos_token_id == 0 and hf.pad_token_id == 1 and hf.bos_token_id is None
    check_same_ids(tokenizer, hf)
    assert hf(TEXT).input_ids == tokenizer.encode(TEXT)


def test_a_sentencepiece_model_palm_did_not_train_is_refused(tmp_path):
    import sentencepiece as spm

    writer = type("W", (), {"data": b"", "write": lambda self, b: setattr(self, "data", b)})()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 50),
        model_writer=writer,
        vocab_size=90,
        add_dummy_prefix=True,
        minloglevel=2,
    )
    with pytest.raises(ConversionError, match="add_dummy_prefix"):
        tokenizer_files(Tokenizer(writer.data), 64)


# ---------------------------------------------------------------------------------------------
# A real checkpoint: the command line, train.init_from, lm-eval


@pytest.fixture(scope="module")
def exported(tmp_path_factory, prepare_dataset, write_run):
    from palm.cli.export import main

    root = tmp_path_factory.mktemp("hf")
    dataset = prepare_dataset(root)
    run = write_run(root, dataset, val_losses=(1.0,))
    out = root / "out"
    argv = ["--checkpoint", str(run), "--to", "hf", str(out), "--max_shard_size", "40KB"]
    assert main(argv) == 0
    return root, dataset, run, out


def test_palm_export_to_hf_loads_in_transformers(exported, capsys):
    from palm.runs import load_model

    _, _, run, out = exported
    loaded = load_model(run)
    hf, tok = load_hf(out), transformers.AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file()  # 40KB shards: several
    check_same_ids(loaded.tokenizer, tok)
    tokens = torch.tensor([tok("The world and the people").input_ids])
    with torch.no_grad():
        assert (loaded.model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    assert_same_state(from_hf(out).state_dict(), loaded.model.state_dict())


def test_palm_export_refusals_and_bad_sizes_are_one_line_errors(exported, tmp_path, capsys):
    from palm.checkpoint import TrainingState, save_checkpoint
    from palm.cli.export import main
    from palm.config import Config

    _, dataset, run, _ = exported
    assert (
        main(
            [
                "--checkpoint",
                str(run),
                "--to",
                "hf",
                str(tmp_path / "a"),
                "--max_shard_size",
                "lots",
            ]
        )
        == 2
    )
    config = Config(model=tiny(vocab_size=400, xpos_scale_base=512.0))
    save_checkpoint(
        tmp_path / "x",
        PaLM(config.model).state_dict(),
        {"state": {}, "param_groups": []},
        TrainingState(step=1),
        config.to_dict(),
    )
    shutil.copy(dataset / "tokenizer.model", tmp_path / "x" / "tokenizer.model")
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "x"), "--to", "hf", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "xPos" in err
    assert not (tmp_path / "b").exists()


def test_fine_tuning_starts_from_a_transformers_folder(exported, tiny_config, tmp_path):
    from safetensors.torch import load_file

    from palm.checkpoint import list_checkpoints
    from palm.runs import init_from, load_model
    from palm.trainer import train

    _, dataset, run, out = exported
    config = tiny_config(dataset, tmp_path, "train.max_steps=1", f"train.init_from={out}")
    result = train(config)
    first = list_checkpoints(result.run_dir / "checkpoints")[0]
    assert first.name == "step_00000000"
    assert_same_state(load_file(first / "model.safetensors"), load_model(run).model.state_dict())
    other = tmp_path / "other"
    shutil.copytree(out, other)
    (other / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(DataError, match="another tokenizer"):
        init_from(
            dataclasses.replace(
                config, train=dataclasses.replace(config.train, init_from=str(other))
            )
        )


LM_EVAL_TASKS = {
    "hf_toy_mc": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "hf_toy_ppl": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
""",
    "hf_toy_gen": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
LM_EVAL_DOCS = [
    {
        "question": "The world and",
        "choices": [" the people", " many men", " old"],
        "answer": 0,
        "text": "The people of the world came back.\nThey made 12 of it.",
    },
    {
        "question": "Life is",
        "choices": [" good", " a state", " very old year"],
        "answer": 1,
        "text": "Still one life, and two years.\n",
    },
    {"question": "", "choices": ["Time", "Back to work"], "answer": 1, "text": "One. Two.  Three"},
]


def numbers(samples: list[dict]) -> list:
    """Every response of every sample, flattened: log-likelihoods, greedy flags, texts."""
    flat = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            flat.extend(resp[0] if isinstance(resp[0], (list, tuple)) else resp)
    return flat


def test_lm_evals_hf_model_scores_the_export_like_our_adapter(exported):
    root, _, run, out = exported
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in LM_EVAL_DOCS))
    for name, body in LM_EVAL_TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        (tasks / f"{name}.yaml").write_text(f"{head}    test: {data}\ntest_split: test\n{body}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
        mp.setenv("HF_HOME", str(root / "hf_home"))
        pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install lm-eval")
        pytest.importorskip("palm.lm_eval_adapter")  # registers --model palm
        import lm_eval.models  # noqa: F401 (registers --model hf, as lm_eval's command does)
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(tasks), include_defaults=False)

        def evaluate(model: str, args: str, names: list[str]) -> dict:
            return simple_evaluate(
                model=model, model_args=args, tasks=names, task_manager=manager, log_samples=True
            )

        hf_args = f"pretrained={out},dtype=float32,device=cpu,batch_size=2"
        ours = evaluate("palm", f"checkpoint={run},batch_size=2", list(LM_EVAL_TASKS))
        theirs = evaluate("hf", hf_args, ["hf_toy_mc", "hf_toy_gen"])
        # lm-eval's rolling scoring puts its own prefix token before what the tokenizer
        # returns, so the tokenizer must not add <eod> as well (our adapter adds it once).
        theirs |= {
            "samples": {
                **theirs["samples"],
                **evaluate("hf", hf_args + ",add_bos_token=False", ["hf_toy_ppl"])["samples"],
            }
        }
    for task in LM_EVAL_TASKS:
        a, b = numbers(ours["samples"][task]), numbers(theirs["samples"][task])
        assert len(a) == len(b) > 0, task
        for x, y in zip(a, b):
            if isinstance(x, float):
                assert abs(x - y) <= 1e-4, task
            else:
                assert x == y, task
