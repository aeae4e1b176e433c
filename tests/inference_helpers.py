"""Shared fixtures for the generate/evaluate/lm-eval/memorization tests: a real prepared dataset
(download.py on a local corpus, with its SentencePiece tokenizer) and a run folder holding
checkpoints of a tiny PaLM, written by palm.checkpoint exactly as the trainer writes them."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from palm.checkpoint import TrainingState, save_checkpoint
from palm.config import Config, DataConfig, ModelConfig
from palm.model import PaLM
from palm.tokenizer import Tokenizer

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "has",
    "been",
    "would",
    "if",
    "more",
    "when",
    "will",
    "no",
    "who",
    "so",
    "can",
    "said",
    "what",
    "out",
    "up",
    "into",
    "them",
    "some",
    "could",
    "its",
    "than",
    "other",
    "time",
    "only",
    "new",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
]


def write_corpus(folder: Path, seed: int = 0) -> Path:
    """train/validation/test .txt files of blank-line separated paragraphs (documents)."""
    rng = random.Random(seed)

    def paragraph() -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
        return f"{words.capitalize()}.\nSecond line of 12 items, {rng.randint(0, 999)}.\n"

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 200), ("validation", 20), ("test", 20)):
        (folder / f"{split}.txt").write_text("\n".join(paragraph() for _ in range(n)))
    return folder


def prepare_dataset(root: Path) -> Path:
    """The real data pipeline (download.py) on the local corpus; returns the dataset folder."""
    from palm.cli.download import main

    corpus = write_corpus(root / "corpus")
    rc = main(
        [
            "--path",
            str(root / "data"),
            "--dataset",
            str(corpus),
            "--vocab_size",
            "400",
            "--documents",
            "paragraph",
            "--seq_len",
            "32",
            "--batch_size",
            "8",
            "--n_workers",
            "1",
            "--download_data",
            "False",
        ]
    )
    assert rc == 0
    return root / "data" / "corpus"


def tiny_model_config(vocab_size: int, max_seq_len: int = 320) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        head_dim=16,
        max_seq_len=max_seq_len,
    )


def write_run(root: Path, dataset: Path, val_losses=(2.0, 1.5, None), seed: int = 0) -> Path:
    """runs/t/ with one checkpoint per val_loss (steps 100, 200, ...), weights differing."""
    tokenizer = Tokenizer.load(dataset / "tokenizer.model")
    config = Config(
        model=tiny_model_config(tokenizer.vocab_size), data=DataConfig(path=str(dataset))
    )
    run = root / "runs" / "t"
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy(dataset / "tokenizer.model", run / "tokenizer.model")
    for index, loss in enumerate(val_losses):
        torch.manual_seed(seed + index)
        model = PaLM(config.model)
        save_checkpoint(
            run / "checkpoints",
            model.state_dict(),
            {"state": {}, "param_groups": []},
            TrainingState(step=100 * (index + 1), val_loss=loss),
            config.to_dict(),
        )
    return run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared machine: one intra-op thread is ~50x faster than spinning up
    several on busy cores. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
