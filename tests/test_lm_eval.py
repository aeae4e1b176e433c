"""The lm-evaluation-harness adapter, offline: local task YAML and data, no hub access.

Its loglikelihoods are checked against the model's own forward, rolling loglikelihood against
a full-document forward, generate_until against palm.sampling.generate.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

TASKS = {
    "palm_toy_mc": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "palm_toy_ppl": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "palm_toy_gen": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}

DOCS = [
    {
        "question": "The world and",
        "choices": [" the people", " many men", " old"],
        "answer": 0,
        "text": "The people of the world came back.\nThey made it.",
    },
    {
        "question": "Life is",
        "choices": [" good", " a state", " very old year"],
        "answer": 1,
        "text": "Still one life, and two years.\n",
    },
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, prepare_dataset, write_run):
    root = tmp_path_factory.mktemp("lmeval")
    with pytest.MonkeyPatch.context() as mp:
        # Offline, with caches inside the test folder (read when `datasets` is first imported).
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
        mp.setenv("HF_HOME", str(root / "hf_home"))
        pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install lm-eval")
        adapter = pytest.importorskip("palm.lm_eval_adapter")
        dataset = prepare_dataset(root)
        run = write_run(root, dataset, val_losses=(1.0,))
        tasks = root / "tasks"
        tasks.mkdir()
        data = tasks / "docs.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
        for name, body in TASKS.items():
            head = (
                f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {data}\ntest_split: test\n"
            )
            (tasks / f"{name}.yaml").write_text(head + body)
        yield adapter, run, tasks


def instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def test_requests_match_the_models_own_scoring(env):
    adapter, run, _ = env
    lm = adapter.PaLMLM(checkpoint=str(run), batch_size=2)
    model, tok = lm.model, lm.tok
    pairs = [("The world and", " the people"), ("", "Life is good"), ("A", " b c d")]
    got = lm.loglikelihood([instance("loglikelihood", p) for p in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        # Reference: <eod> + the pair's tokens, one forward, the continuation's log-probs.
        n_ctx = len(tok.encode(context))
        seq = [tok.eod_id] + tok.encode(context + continuation)
        logits = F.log_softmax(model(torch.tensor([seq[:-1]]))[0].double(), -1)
        targets = torch.tensor(seq[1 + n_ctx :])
        picked = logits[n_ctx:]
        assert logprob == pytest.approx(float(picked.gather(1, targets[:, None]).sum()), rel=1e-5)
        assert greedy == bool((picked.argmax(-1) == targets).all())
    texts = [d["text"] for d in DOCS]
    rolling = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (t,)) for t in texts])
    for text, value in zip(texts, rolling):
        seq = torch.tensor([[tok.eod_id] + tok.encode(text)])
        reference = -F.cross_entropy(model(seq)[0, :-1].double(), seq[0, 1:], reduction="sum")
        assert value == pytest.approx(float(reference), rel=1e-5)
    from palm.sampling import generate

    outs = lm.generate_until(
        [instance("generate_until", ("The world", {"until": ["e"], "max_gen_toks": 8}))]
    )
    prompt = torch.tensor([[tok.eod_id] + tok.encode("The world")])
    new = generate(model, prompt, 8, temperature=0.0, eod_id=tok.eod_id)[0].tolist()
    text = tok.decode(new[: new.index(tok.eod_id)] if tok.eod_id in new else new)
    assert outs == [text.split("e")[0]]


def test_simple_evaluate_by_registered_name_and_palm_evaluate_cli(env, capsys):
    adapter, run, tasks = env
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    assert get_model("palm") is adapter.PaLMLM  # what `--model palm` resolves to
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    results = simple_evaluate(
        model="palm",
        model_args=f"checkpoint={run},batch_size=4",
        tasks=list(TASKS),
        task_manager=manager,
        log_samples=False,
    )
    metrics = results["results"]
    assert set(metrics) == set(TASKS)
    assert metrics["palm_toy_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert metrics["palm_toy_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    # word_perplexity from the harness = exp(-sum loglikelihood / words) of our rolling scores.
    lm = adapter.PaLMLM(checkpoint=str(run))
    rolling = lm.loglikelihood_rolling(
        [instance("loglikelihood_rolling", (d["text"],)) for d in DOCS]
    )
    words = sum(len(re.split(r"\s+", d["text"])) for d in DOCS)  # lm-eval's word count
    assert metrics["palm_toy_ppl"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(rolling) / words), rel=1e-5
    )

    from palm.cli.evaluate import main

    capsys.readouterr()
    rc = main(
        [str(run), "--tasks", "palm_toy_mc,palm_toy_ppl", "--include_path", str(tasks), "--json"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    cli = json.loads(out[out.index("{") :])["results"]
    assert cli["palm_toy_mc"]["acc,none"] == metrics["palm_toy_mc"]["acc,none"]
    assert cli["palm_toy_ppl"]["word_perplexity,none"] == pytest.approx(
        metrics["palm_toy_ppl"]["word_perplexity,none"], rel=1e-6
    )
