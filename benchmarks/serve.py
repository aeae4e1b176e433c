"""palm serve under load: requests/s and tokens/s at 1, 4 and 16 concurrent clients.

    python benchmarks/serve.py --concurrency 1 4 16 --seconds 10 --threads 1
    python benchmarks/serve.py --run runs/quickstart   # a trained run instead of a random one

Starts `palm serve` as its own process (as a user would), then for each concurrency level runs
that many client threads for `--seconds`, each sending non-streaming /v1/completions requests
back to back over a kept-alive connection: the same prompt (so requests can share a batch),
`--max_tokens` new tokens with `ignore_eos` (every request decodes the same amount), sampled at
temperature 1 with its own seed. requests/s and tokens/s count completed requests and their
completion tokens over the wall time; latency is per request. Each level is measured with the
server's batching on and off (`--batching off`: one request per forward); the two servers run
side by side and their cells alternate, and each cell keeps the best of `--repeats` runs, so a
busy neighbour on a shared machine skews both alike and less.

Without --run, a random model of size S (d_model 256, 4 layers, as benchmarks/decode.py) with a
1024-piece SentencePiece tokenizer trained on a synthetic text is written to a temporary run.
The clients share the machine with the server: on a small CPU they take part of it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout, like the other benchmarks
    sys.path.insert(0, str(ROOT))

from benchmarks.common import median
from palm.checkpoint import TrainingState, save_checkpoint
from palm.config import Config, DataConfig, ModelConfig
from palm.model import PaLM
from palm.tokenizer import Tokenizer, TokenizerTrainConfig, train_sentencepiece

SIZE_S = {"d_model": 256, "n_layers": 4, "n_heads": 4, "head_dim": 64}
PROMPT = "The history of the city begins with a small settlement on the river"


def write_random_run(folder: Path, vocab_size: int = 1024) -> Path:
    """runs/bench: a random PaLM of size S and a tokenizer trained on synthetic sentences."""
    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(3000)]
    words += PROMPT.lower().split()
    sentences = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)]
    blob = train_sentencepiece(sentences, TokenizerTrainConfig(vocab_size=vocab_size))
    run = folder / "bench"
    run.mkdir(parents=True)
    (run / "tokenizer.model").write_bytes(blob)
    vocab = Tokenizer(blob).vocab_size
    config = Config(
        model=ModelConfig(vocab_size=vocab, max_seq_len=1024, **SIZE_S),
        data=DataConfig(path=str(folder)),
    )
    torch.manual_seed(0)
    save_checkpoint(
        run / "checkpoints",
        PaLM(config.model).state_dict(),
        {"state": {}, "param_groups": []},
        TrainingState(step=0),
        config.to_dict(),
    )
    return run


class ServerProcess:
    def __init__(
        self, run: Path, batching: str, threads: int, log: Path, transposed: str = "auto"
    ) -> None:
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
            "--batching",
            batching,
            "--threads",
            str(threads),
            "--max_rows",
            "32",
            "--max_queue",
            "64",
            "--log_level",
            "warning",
            "--model_name",
            "bench",
            "--transposed_weights",
            transposed,
        ]
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline, found = time.monotonic() + 120, None
        while found is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"palm serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
        self.port = int(found.group(1))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def client(port: int, seed: int, max_tokens: int, stop_at: float, out: list) -> None:
    """Send requests back to back until `stop_at`; append (latency, completion tokens)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    while time.perf_counter() < stop_at:
        body = {
            "model": "bench",
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 1.0,
            "seed": seed,
        }
        seed += 1000
        start = time.perf_counter()
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        reply = json.loads(response.read())
        if response.status != 200:
            raise SystemExit(f"request failed: {response.status} {reply}")
        out.append((time.perf_counter() - start, reply["usage"]["completion_tokens"]))
    conn.close()


def engine_counts(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    counts = json.loads(conn.getresponse().read())
    conn.close()
    return counts


def measure(port: int, clients: int, seconds: float, max_tokens: int) -> dict:
    results: list[list] = [[] for _ in range(clients)]
    before = engine_counts(port)
    start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(port, i, max_tokens, start + seconds, results[i]))
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start  # includes the requests still running at the deadline
    done = [item for per_client in results for item in per_client]
    latencies = sorted(latency for latency, _ in done)
    after = engine_counts(port)
    batches = after["batches"] - before["batches"]
    return {
        "clients": clients,
        "requests": len(done),
        "seconds": round(wall, 2),
        "requests_per_s": len(done) / wall,
        "tokens_per_s": sum(tokens for _, tokens in done) / wall,
        "latency_p50_s": median(latencies),
        "latency_p90_s": latencies[int(0.9 * (len(latencies) - 1))],
        "requests_per_batch": (after["completed"] - before["completed"]) / max(batches, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a run or checkpoint folder (default: random S)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=10.0, help="load time per level")
    p.add_argument("--max_tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--batching", nargs="+", default=["on", "off"], choices=("on", "off"))
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs per cell; the best is kept (shared CPUs)"
    )
    p.add_argument(
        "--transposed_weights",
        choices=("auto", "on", "off"),
        default="auto",
        help="the servers' --transposed_weights (decoding's weight copies)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else write_random_run(Path(tmp))
        servers = {}
        try:  # every mode's server up at once (an idle one costs nothing): cells alternate
            for mode in args.batching:
                log = Path(tmp) / f"{mode}.log"
                servers[mode] = ServerProcess(run, mode, args.threads, log, args.transposed_weights)
                measure(servers[mode].port, 1, 1.0, args.max_tokens)  # warm-up
            best: dict[tuple[str, int], dict] = {}
            for clients in args.concurrency:
                for repeat in range(args.repeats):
                    for mode, server in servers.items():
                        row = measure(server.port, clients, args.seconds, args.max_tokens)
                        row = {"batching": mode, "repeat": repeat, **row}
                        print(json.dumps(row), file=sys.stderr, flush=True)
                        key = (mode, clients)
                        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
                            best[key] = row
        finally:
            for server in servers.values():
                server.close()
    rows = [best[(mode, clients)] for mode in args.batching for clients in args.concurrency]
    print(
        f"\npalm serve, {run if args.run else 'random S (d_model 256, 4 layers)'}, "
        f"{args.max_tokens} new tokens per request, best of {args.repeats} x {args.seconds:g} s, "
        f"server threads {args.threads}, --transposed_weights {args.transposed_weights}, "
        f"torch {torch.__version__}, load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print(
        "| batching | clients | requests | requests/s | tokens/s | latency p50 s | p90 s "
        "| requests per batch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batching']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} "
            f"| {r['tokens_per_s']:,.0f} | {r['latency_p50_s']:.2f} | {r['latency_p90_s']:.2f} "
            f"| {r['requests_per_batch']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
