"""palm serve: a real server process on 127.0.0.1 driven by the official `openai` client and by
raw HTTP, against generate.py's own output; and the engine's batching and queue in-process.

Completions equal generate.py's for the same seed and options (streamed or not, one client or
eight at once); each bad request gets its 4xx in OpenAI's error shape; a full queue is 429; a
client that goes away mid-stream stops its generation and the server goes on serving.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from palm.batching import Done, Failed, Job, Step  # noqa: E402
from palm.cli.generate import build_parser, sample  # noqa: E402
from palm.engine import Engine  # noqa: E402
from palm.errors import BusyError  # noqa: E402
from palm.runs import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 2048  # long enough that a full-length generation outlasts a client that leaves
MAX_ROWS, MAX_QUEUE, CAP = 8, 8, 1600


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepare_dataset, tiny_model_config) -> Path:
    """runs/t: one checkpoint of a tiny PaLM (context 2048) with the corpus' tokenizer."""
    from palm.checkpoint import TrainingState, save_checkpoint
    from palm.config import Config, DataConfig
    from palm.model import PaLM
    from palm.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("serve")
    data = prepare_dataset(root)
    tokenizer = Tokenizer.load(data / "tokenizer.model")
    config = Config(
        model=tiny_model_config(tokenizer.vocab_size, max_seq_len=CONTEXT),
        data=DataConfig(path=str(data)),
    )
    run = root / "runs" / "t"
    run.mkdir(parents=True)
    shutil.copy(data / "tokenizer.model", run / "tokenizer.model")
    torch.manual_seed(0)
    state = TrainingState(step=1, val_loss=None)
    empty = {"state": {}, "param_groups": []}
    save_checkpoint(
        run / "checkpoints", PaLM(config.model).state_dict(), empty, state, config.to_dict()
    )
    return run


@pytest.fixture(scope="module")
def loaded(run):
    return load_model(run)


def generated(loaded, prompts: list[str], **options) -> list[str]:
    """What generate.py prints for these prompts and options (its own sample())."""
    argv = [str(loaded.path)]
    for key, value in options.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            argv += [f"--{key}"] + ([] if item is True else [str(item)])
    args = build_parser().parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    return sample(loaded, prompts, args, generator, out=io.StringIO())


class Server:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def request(self, method: str, path: str, body: bytes | dict | None = None):
        """(status, parsed JSON) of one raw HTTP request."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def wait_for(self, condition, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.health()
            if condition(stats):
                return stats
            time.sleep(0.05)
        raise AssertionError(f"server never reached the state; last /health: {stats}")


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [
        sys.executable,
        "-m",
        "palm",
        "serve",
        str(run),
        "--port",
        "0",
        "--threads",
        "1",
        "--max_rows",
        str(MAX_ROWS),
        "--max_queue",
        str(MAX_QUEUE),
        "--max_tokens_cap",
        str(CAP),
        "--log_level",
        "warning",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        port, deadline = None, time.monotonic() + 90
        while port is None:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else None
            assert proc.poll() is None, f"palm serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"palm serve never listened: {log.read_text()}"
            time.sleep(0.1)
        server = Server(proc, port)
        server.wait_for(lambda stats: stats["status"] == "ok")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Against generate.py


CASES = [  # (name, prompts, request options)
    ("greedy", ["the world"], dict(max_tokens=24, temperature=0)),
    ("top_k", ["the world"], dict(max_tokens=30, temperature=0.9, top_k=40, seed=3)),
    ("top_p, stop", ["a long prompt"], dict(max_tokens=30, top_p=0.8, seed=5, stop=["e", "d "])),
    ("padded batch, n", ["the", "a long prompt of many words"], dict(max_tokens=20, n=2, seed=7)),
    ("past eod", ["of"], dict(max_tokens=40, temperature=1.2, seed=11, ignore_eos=True)),
]


def generate_options(options: dict) -> dict:
    """The generate.py flags of an API request's options."""
    names = {"max_tokens": "max_new_tokens", "n": "num_samples", "ignore_eos": "ignore_eod"}
    options = {"temperature": 1.0, **options}  # the API's default; generate.py's is 0.8
    return {names.get(key, key): value for key, value in options.items()}


def api_options(options: dict) -> dict:
    """The openai client's arguments: top_k and ignore_eos are extensions (extra_body)."""
    options = dict(options)
    extra = {key: options.pop(key) for key in ("top_k", "ignore_eos") if key in options}
    return {**options, "extra_body": extra} if extra else options


@pytest.mark.parametrize(("name", "prompts", "options"), CASES, ids=[c[0] for c in CASES])
def test_completions_equal_generate_py(server, loaded, name, prompts, options):
    expected = generated(loaded, prompts, **generate_options(options))
    prompt = prompts[0] if len(prompts) == 1 else prompts
    reply = server.client.completions.create(model="t", prompt=prompt, **api_options(options))
    assert [choice.index for choice in reply.choices] == list(range(len(expected)))
    assert [choice.text for choice in reply.choices] == expected
    assert {choice.finish_reason for choice in reply.choices} <= {"stop", "length"}
    usage = reply.usage
    assert usage.prompt_tokens == sum(1 + len(loaded.tokenizer.encode(p)) for p in prompts)
    assert 0 < usage.completion_tokens <= options["max_tokens"] * len(expected)


@pytest.mark.parametrize("case", [1, 3], ids=["one", "two prompts x 2"])
def test_streaming_yields_the_same_text(server, case):
    _, prompts, options = CASES[case]
    prompt = prompts[0] if len(prompts) == 1 else prompts
    whole = server.client.completions.create(model="t", prompt=prompt, **api_options(options))
    texts, finish, chunks = {}, {}, 0
    for chunk in server.client.completions.create(
        model="t", prompt=prompt, stream=True, **api_options(options)
    ):
        chunks += 1
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert chunks > 3  # pieces arrive as they are made
    assert [texts[i] for i in range(len(whole.choices))] == [c.text for c in whole.choices]
    assert [finish[i] for i in range(len(whole.choices))] == [
        c.finish_reason for c in whole.choices
    ]


def test_the_event_stream_ends_with_done_and_can_carry_the_usage(server):
    body = {
        "model": "t",
        "prompt": "the",
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    assert response.status == 200 and response.getheader("content-type").startswith(
        "text/event-stream"
    )
    events = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5


def test_eight_concurrent_clients_all_get_their_answers(server, loaded):
    """Same-width prompts (so they can share batches), each its own seed and options."""
    requests = [
        dict(max_tokens=25, temperature=0 if i % 2 else 1.0, seed=100 + i, top_k=20 * (i % 3))
        for i in range(8)
    ]
    expected = [generated(loaded, ["the world"], **generate_options(r))[0] for r in requests]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def client(i: int) -> None:
        try:
            barrier.wait()
            reply = server.client.completions.create(
                model="t", prompt="the world", **api_options(requests[i])
            )
            results[i] = reply.choices[0].text
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert [results[i] for i in range(8)] == expected


def test_echo_and_logprobs_are_the_models_own(server, loaded):
    """Every token's log-probability equals one uncached forward of the whole text."""
    tokenizer, model = loaded.tokenizer, loaded.model
    reply = server.client.completions.create(
        model="t", prompt="the world", max_tokens=6, temperature=0, echo=True, logprobs=3
    )
    choice = reply.choices[0]
    completion = generated(loaded, ["the world"], max_new_tokens=6, temperature=0)[0]
    assert choice.text == "the world" + completion
    prompt_ids = tokenizer.encode("the world")
    new_ids = torch.tensor([[tokenizer.eod_id] + prompt_ids])
    from palm.sampling import generate

    new = generate(model, new_ids, 6, temperature=0.0, eod_id=tokenizer.eod_id)[0].tolist()
    ids = [tokenizer.eod_id] + prompt_ids + [t for t in new if t != tokenizer.eod_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    want = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert choice.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert len(choice.logprobs.tokens) == len(ids) - 1
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset == sorted(
        choice.logprobs.text_offset
    )
    # max_tokens 0 with echo: scoring only (how lm-eval's completions backend asks)
    scored = server.client.completions.create(
        model="t", prompt="the world", max_tokens=0, echo=True, logprobs=0
    ).choices[0]
    assert scored.text == "the world"
    assert scored.logprobs.token_logprobs == pytest.approx(want[: len(prompt_ids)], abs=1e-4)


def test_models_health_and_chat(server):
    status, models = server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["t"]
    assert models["data"][0]["max_model_len"] == CONTEXT
    assert server.health()["status"] == "ok"
    with pytest.raises(openai.BadRequestError, match="chat template"):
        server.client.chat.completions.create(
            model="t", messages=[{"role": "user", "content": "hi"}]
        )


# ---------------------------------------------------------------------------------------------
# Refusals

LONG = "the world and the people " * 500  # well over the 2048-token context


def body(**fields) -> dict:
    return {"model": "t", "prompt": "x", **fields}


BAD = [  # (name, body, status, the field named, words of the message)
    ("bad JSON", b'{"model": "t", "prompt": ', 400, None, "not valid JSON"),
    ("unknown field", body(typical_p=0.9), 400, "typical_p", "unknown field"),
    ("prompt too long", body(prompt=LONG), 400, "prompt", "context of 2048"),
    ("negative max_tokens", body(max_tokens=-1), 400, "max_tokens", "greater than or equal"),
    ("over the cap", body(max_tokens=CAP + 1), 400, "max_tokens", "cap of 1600"),
    ("no room left", body(prompt="the " * 600, max_tokens=CAP), 400, "max_tokens", "context"),
    ("too many rows", body(prompt=["a", "b", "c"], n=3), 400, "n", "9 sequences"),
    ("bad top_p", body(top_p=0), 400, "top_p", "greater than 0"),
    ("bad prompt", body(prompt=5), 400, "prompt", "list of strings"),
    ("penalty", body(presence_penalty=1), 400, "presence_penalty", "not supported"),
    ("no model", {"prompt": "x"}, 400, "model", "required"),
    ("nested unknown", body(stream=True, stream_options={"x": 1}), 400, "stream_options", ".x:"),
    ("another model", body(model="gpt-4"), 404, "model", "not served"),
]


@pytest.mark.parametrize(("name", "body", "status", "param", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_4xx_naming_the_field(server, name, body, status, param, words):
    got, reply = server.request("POST", "/v1/completions", body)
    assert got == status
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]
    assert param is None or error["message"].startswith(param)
    assert server.health()["status"] == "ok"


def stream_request(server: Server, body: dict) -> tuple[http.client.HTTPConnection, object]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True}),
        {"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # decoding has started
    return conn, response


LONG_JOB = {"model": "t", "prompt": "the", "max_tokens": CAP, "ignore_eos": True, "seed": 1}


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, loaded):
    before = server.health()["cancelled"]
    conn, response = stream_request(server, LONG_JOB)
    response.readline()
    conn.sock.shutdown(2)  # the client goes away (as when its process is killed)
    conn.close()
    stats = server.wait_for(lambda s: s["cancelled"] == before + 1 and s["running"] == 0)
    assert stats["status"] == "ok"
    # The server goes on serving, with the same answers.
    reply = server.client.completions.create(
        model="t", prompt="the world", max_tokens=24, temperature=0
    )
    assert (
        reply.choices[0].text
        == generated(loaded, ["the world"], **generate_options(CASES[0][2]))[0]
    )


def test_a_waiting_client_that_leaves_cancels_its_request(server):
    """Without streaming too: the server notices within half a second."""
    before = server.health()["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({**LONG_JOB, "n": MAX_ROWS}),
        {"Content-Type": "application/json"},
    )
    server.wait_for(lambda s: s["running"] == 1)
    started = time.monotonic()
    conn.sock.shutdown(2)
    conn.close()
    server.wait_for(lambda s: s["cancelled"] == before + 1 and s["running"] == 0)
    assert time.monotonic() - started < 5


def test_a_full_queue_is_429_and_the_queued_requests_still_complete(server):
    conn, response = stream_request(server, {**LONG_JOB, "n": MAX_ROWS})  # every row taken
    replies: list[int] = []

    def queued() -> None:
        replies.append(server.request("POST", "/v1/completions", body(max_tokens=4))[0])

    threads = [threading.Thread(target=queued) for _ in range(MAX_QUEUE)]
    for thread in threads:
        thread.start()
    server.wait_for(lambda s: s["queued"] == MAX_QUEUE)
    status, reply = server.request("POST", "/v1/completions", body())
    assert status == 429
    assert reply["error"]["code"] == "queue_full" and "queue is full" in reply["error"]["message"]
    conn.close()  # the long job goes; the queued ones run
    for thread in threads:
        thread.join(timeout=60)
    assert replies == [200] * MAX_QUEUE


# ---------------------------------------------------------------------------------------------
# The engine in-process: batching, cancellation, failures, the queue bound


def collect(engine: Engine, jobs: list[Job], timeout: float = 60.0) -> dict[int, list]:
    """Start the engine and wait until every job has ended; the events of each job."""
    events: dict[int, list] = {id(job): [] for job in jobs}
    ended = threading.Semaphore(0)
    for job in jobs:

        def emit(event, job=job):
            events[id(job)].append(event)
            if isinstance(event, Done | Failed):
                ended.release()

        job.emit = emit
        engine.submit(job)
    engine.start()
    try:
        for _ in jobs:
            assert ended.acquire(timeout=timeout)
    finally:
        engine.stop()
    return events


def texts_of(events: list) -> list[str]:
    steps = [e for e in events if isinstance(e, Step)]
    return ["".join(step.texts[row] for step in steps) for row in range(len(steps[0].texts))]


def make_job(tokenizer, prompts, **options) -> Job:
    ids = [[tokenizer.eod_id] + tokenizer.encode(p) for p in prompts]
    return Job(ids, options.pop("max_tokens"), emit=None, **options)


def test_engine_batches_equal_widths_and_each_job_decodes_as_generate_py(
    loaded, weight_copies_made
):
    tok = loaded.tokenizer
    made = weight_copies_made  # one set (packed here) for the engine, shared by its batches
    specs = [
        (["the world"], dict(max_tokens=20, temperature=0.0)),
        (["the world"], dict(max_tokens=9, seed=4, top_k=30)),  # leaves the batch early
        (["the world"], dict(max_tokens=30, seed=5, top_p=0.7, stop=("e",))),
        (["of", "the world"], dict(max_tokens=15, seed=6, n=2)),  # padded: its own batch
    ]
    jobs = [make_job(tok, prompts, **dict(options)) for prompts, options in specs]
    assert len({job.batch_key for job in jobs}) == 2
    engine = Engine(loaded.model, tok, max_rows=16)
    events = collect(engine, jobs)
    assert engine.counts["batches"] == 2 and engine.largest_batch == 3
    assert len(made) == 1 and engine.transposed is made[0]  # CPU float32: on, made once
    made.clear()
    off = Engine(loaded.model, tok, max_rows=16, transposed_weights=False)
    assert texts_of(collect(off, jobs[:1])[id(jobs[0])]) == texts_of(events[id(jobs[0])])
    assert made == [] and off.transposed is False  # off: no batch makes copies of its own
    for job, (prompts, options) in zip(jobs, specs):
        flags = {
            "max_new_tokens": options["max_tokens"],
            "num_samples": options.get("n", 1),
            "seed": options.get("seed", 0),
            "temperature": options.get("temperature", 1.0),
            "top_k": options.get("top_k", 0),
            "top_p": options.get("top_p", 1.0),
            "stop": list(options.get("stop", ())),
        }
        assert texts_of(events[id(job)]) == generated(loaded, prompts, **flags)
        assert isinstance(events[id(job)][-1], Done)


def test_engine_a_cancelled_job_leaves_and_its_batch_mate_is_unchanged(loaded):
    tok = loaded.tokenizer
    keep = make_job(tok, ["the world"], max_tokens=25, seed=9)
    leave = make_job(tok, ["the world"], max_tokens=25, seed=10)
    engine = Engine(loaded.model, tok)
    steps = []

    def cancel_after_three(event):
        steps.append(event)
        if len(steps) == 3:
            leave.cancelled.set()

    events = {id(keep): []}
    keep.emit = events[id(keep)].append
    leave.emit = cancel_after_three
    engine.submit(keep)
    engine.submit(leave)
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while not any(isinstance(e, Done) for e in events[id(keep)]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        engine.stop()
    assert engine.largest_batch == 2 and engine.counts["cancelled"] == 1
    assert len(steps) == 3 and not any(isinstance(e, Done) for e in steps)
    assert texts_of(events[id(keep)]) == generated(
        loaded, ["the world"], max_new_tokens=25, seed=9, temperature=1.0
    )


def test_engine_a_failing_job_fails_alone_and_the_worker_goes_on(loaded):
    tok = loaded.tokenizer
    broken = Job([[tok.eod_id, 10**6]], 5, emit=None)  # a token id outside the vocabulary
    fine = make_job(tok, ["the"], max_tokens=5, temperature=0.0)
    engine = Engine(loaded.model, tok, batching=False)
    events = collect(engine, [broken, fine])
    assert isinstance(events[id(broken)][-1], Failed)
    assert "internal error" in events[id(broken)][-1].message
    assert texts_of(events[id(fine)]) == generated(loaded, ["the"], max_new_tokens=5, temperature=0)
    assert engine.counts["failed"] == 1 and engine.counts["completed"] == 1


def test_engine_queue_is_bounded(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, max_queue=2)
    for _ in range(2):
        engine.submit(make_job(loaded.tokenizer, ["a"], max_tokens=2))
    with pytest.raises(BusyError, match="queue is full"):
        engine.submit(make_job(loaded.tokenizer, ["a"], max_tokens=2))
    assert engine.stats()["queued"] == 2
