"""Which split each piece of text goes to: official split files, document hashes, or, when a
corpus has too few documents for its held-out fractions, cuts in the text itself.

`--split True` assigns whole documents by the hash of their text (identical documents never
straddle train and test). A corpus of one file (Tiny Shakespeare) or a handful would give empty
held-out splits that way, so then the text is cut instead, nanoGPT-style: the first part is
train, the next validation, the last test, each cut moved to the nearest paragraph (else line,
else word) boundary. Both are deterministic, so a rerun gives the same splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from palm.data.corpus import SPLITS, Corpus, iter_documents, split_of
from palm.errors import DataError


@dataclass(frozen=True)
class SplitPlan:
    method: str  # "official" (the corpus's files), "none", "hash" (by document) or "cut"
    valid_fraction: float = 0.0
    test_fraction: float = 0.0
    # "cut": character offsets, in the training files' documents laid end to end, where the
    # validation and the test text start; and the total number of characters.
    cuts: tuple[int, int] = (0, 0)
    total_chars: int = 0

    def describe(self) -> dict:
        out = {"method": self.method}
        if self.method == "cut":
            out.update(cut_at_chars=list(self.cuts), total_chars=self.total_chars)
        return out


def plan_splits(corpus: Corpus, split: bool, valid_fraction: float, test_fraction: float):
    """How `corpus` is split. Reads documents only until every requested held-out split has one
    (at once for any large corpus); to the end when it never happens, and then cuts."""
    if corpus.has_official_splits:
        return SplitPlan("official")
    if not split:
        return SplitPlan("none")
    wanted = {
        name for name, f in (("validation", valid_fraction), ("test", test_fraction)) if f > 0
    }
    seen, total, n_docs = set(), 0, 0
    for path in corpus.files["train"]:
        for text in iter_documents(path, corpus.documents):
            seen.add(split_of(text, valid_fraction, test_fraction))
            if wanted <= seen:
                return SplitPlan("hash", valid_fraction, test_fraction)
            total, n_docs = total + len(text), n_docs + 1
    train_end = round(total * (1.0 - valid_fraction - test_fraction))
    valid_end = round(total * (1.0 - test_fraction))
    plan = SplitPlan("cut", valid_fraction, test_fraction, (train_end, valid_end), total)
    train_fraction = 1.0 - valid_fraction - test_fraction
    print(
        f"split: {n_docs} document(s) are too few to give every held-out split a document by "
        f"hash; cutting the text instead: train = the first {train_fraction:.1%}, validation = "
        f"the next {valid_fraction:.1%}, test = the last {test_fraction:.1%} of {total:,} "
        f"characters, each cut at the nearest paragraph or line boundary"
    )
    return plan


def output_splits(corpus: Corpus, plan: SplitPlan) -> list[str]:
    if plan.method == "official":
        return list(corpus.files)
    return list(SPLITS) if plan.method in ("hash", "cut") else ["train"]


def labeled_documents(
    corpus: Corpus, plan: SplitPlan, only_train: bool = False
) -> Iterator[tuple[str, str]]:
    """(split, text) for every document (or cut piece), in a fixed order (files sorted,
    documents in order)."""
    if plan.method == "cut":
        yield from _cut_documents(corpus, plan, only_train)
        return
    for split, files in corpus.files.items():
        if only_train and split != "train":
            continue
        for path in files:
            for text in iter_documents(path, corpus.documents):
                label = split
                if plan.method == "hash":
                    label = split_of(text, plan.valid_fraction, plan.test_fraction)
                if not only_train or label == "train":
                    yield label, text


def _cut_documents(corpus: Corpus, plan: SplitPlan, only_train: bool) -> Iterator[tuple[str, str]]:
    produced = set()
    start = 0  # offset of this document's first character in the whole text
    for path in corpus.files["train"]:
        for text in iter_documents(path, corpus.documents):
            inner = [c for c in plan.cuts if start < c < start + len(text)]
            bounds = [0]
            for c in inner:  # each cut moved to a boundary, never before the previous one
                bounds.append(max(bounds[-1], _boundary(text, c - start)))
            bounds.append(len(text))
            labels = [_region(start, plan.cuts), *(_region(c, plan.cuts) for c in inner)]
            for label, a, b in zip(labels, bounds, bounds[1:]):
                if b > a and (not only_train or label == "train"):
                    produced.add(label)
                    yield label, text[a:b]
            start += len(text)
    wanted = {"train"} | {
        name for name, f in (("validation", plan.valid_fraction), ("test", plan.test_fraction)) if f
    }
    if not only_train and not wanted <= produced:
        raise DataError(
            f"{corpus.name}: {plan.total_chars} characters are too little text to cut into "
            f"{', '.join(sorted(wanted))}; use a bigger corpus or lower the fractions"
        )


def _region(offset: int, cuts: tuple[int, int]) -> str:
    return "train" if offset < cuts[0] else "validation" if offset < cuts[1] else "test"


def _boundary(text: str, k: int) -> int:
    """The cut nearest to character k at a paragraph, else a line, else a word boundary."""
    for separator, reach in (("\n\n", len(text) // 20), ("\n", len(text) // 10), (" ", len(text))):
        found = [
            i + len(separator)
            for i in (text.rfind(separator, 0, k), text.find(separator, k))
            if i >= 0
        ]
        found = [c for c in found if 0 < c < len(text) and abs(c - k) <= max(reach, 1)]
        if found:
            return min(found, key=lambda c: (abs(c - k), c))
    return k
