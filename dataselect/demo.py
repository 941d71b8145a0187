"""Generated data for the embedded demo: sources whose effect on the target is known.

The target translates three-word phrases of a made-up language word by word with a fixed
lexicon. Sources either teach that lexicon (`lexicon`: short and long phrases; `lexicon_cot`:
a short rationale then the answer), are unrelated (`trivia`: letter puzzles and capitals, in chat
format), or look like the target but are wrong: answers from a scrambled lexicon
(`wrong_answers`), or rationales with wrong glosses that the answer then follows
(`wrong_rationales`). `unlabeled` mixes helpful, corrupted and unrelated rows with no task
column, to be split by clustering. A few malformed rows show how rejections are counted.

Responses are short and made mostly of lexicon words: the tokens that decide correctness are a
large share of each response, the regime the method's per-example output function needs.
Every row carries `quality` (helpful / irrelevant / corrupted / malformed) for tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_SOURCES = ("lexicon", "lexicon_cot", "trivia", "wrong_answers", "wrong_rationales", "unlabeled")
DEMO_TARGET = "target"

FOREIGN = ["ka", "lo", "mi", "tu", "ren", "sol", "vek", "dar", "pim", "zo",
           "bex", "nul", "qua", "fen", "gor", "hap", "jix", "wim", "yor", "cus"]
ENGLISH = ["red", "big", "dog", "cat", "sun", "tree", "blue", "small", "fish", "bird",
           "green", "old", "house", "river", "stone", "cold", "hot", "bright", "dark", "road"]
SCRAMBLED = ENGLISH[7:] + ENGLISH[:7]  # a wrong lexicon: every word maps to another word
_LETTERS = "abcdefghij"
_PLACES = ["Borland", "Quessa", "Tamrin", "Ulvane", "Dorvik", "Felsk", "Marrow", "Istra"]
_CAPITALS = ["Kest", "Orlo", "Brin", "Tavi", "Molk", "Serra", "Adun", "Pirel"]


def materialize(name: str, folder: Path, seed: int) -> Path:
    """Write demo dataset `name` under `folder` (idempotent) and return its path."""
    if name not in DEMO_SOURCES + (DEMO_TARGET,):
        raise ValueError(f"unknown demo dataset demo:{name}; known: {', '.join(DEMO_SOURCES + (DEMO_TARGET,))}")
    rng = random.Random(f"{seed}:{name}")
    folder.mkdir(parents=True, exist_ok=True)
    if name == DEMO_TARGET:
        path = folder / DEMO_TARGET
        path.mkdir(exist_ok=True)
        for split, rows in _target_splits(seed).items():
            _write_jsonl(path / f"{split}.jsonl", rows)
        return path
    path = folder / f"{name}.jsonl"
    taken = {r["question"] for split in _target_splits(seed).values() for r in split}
    _write_jsonl(path, [r for r in _GENERATORS[name](rng) if r.get("question") not in taken])
    return path


def _target_splits(seed: int) -> dict[str, list[dict]]:
    """The target's phrases; a source row asking one of them is left out, so no source copies the
    target (the manifest's contamination check would find it)."""
    rng = random.Random(f"{seed}:{DEMO_TARGET}")
    rows: dict[str, dict] = {}
    while len(rows) < 400:  # distinct phrases, so the test split shares none with validation either
        row = _translation(rng, 3)
        rows.setdefault(row["question"], row)
    phrases = list(rows.values())
    return {"validation": phrases[:200], "test": phrases[200:]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _translation(rng: random.Random, words: int, kind: str = "correct", cot: bool = False) -> dict:
    """Translate `words` lexicon words; `kind` corrupts the answer or the rationale."""
    idx = rng.sample(range(len(FOREIGN)), words)
    lexicon = SCRAMBLED if kind == "wrong_answer" else ENGLISH
    gloss = [lexicon[i] for i in idx]
    if kind == "wrong_rationale":
        gloss = [SCRAMBLED[i] for i in idx]
    answer = " ".join(gloss)
    if cot:
        answer = " , ".join(f"{FOREIGN[i]} {g}" for i, g in zip(idx, gloss)) + " so " + answer
    return {"question": "Translate : " + " ".join(FOREIGN[i] for i in idx), "answer": answer,
            "task": "short" if words <= 2 else "long",
            "quality": "helpful" if kind == "correct" else "corrupted"}


def _trivia_row(rng: random.Random, task: str) -> dict:
    if task == "reverse":
        word = rng.sample(_LETTERS, rng.randint(3, 5))
        q, a = "Reverse the letters " + " ".join(word), " ".join(word[::-1])
    elif task == "sort":
        word = rng.sample(_LETTERS, rng.randint(3, 5))
        q, a = "Sort the letters " + " ".join(word), " ".join(sorted(word))
    else:
        i = rng.randrange(len(_PLACES))
        q, a = f"What is the capital of {_PLACES[i]} ?", _CAPITALS[i]
    return {"question": q, "answer": a, "task": task, "quality": "irrelevant"}


def _phrases(rng: random.Random, kind: str, cot: bool = False) -> list[dict]:
    """150 short (2-word) and 150 long (3-4 word) phrases."""
    return ([_translation(rng, 2, kind, cot) for _ in range(150)]
            + [_translation(rng, rng.randint(3, 4), kind, cot) for _ in range(150)])


def _lexicon(rng: random.Random) -> list[dict]:
    return _phrases(rng, "correct")


def _lexicon_cot(rng: random.Random) -> list[dict]:
    return _phrases(rng, "correct", cot=True)[::2]


def _wrong_answers(rng: random.Random) -> list[dict]:
    return _phrases(rng, "wrong_answer")


def _wrong_rationales(rng: random.Random) -> list[dict]:
    return _phrases(rng, "wrong_rationale", cot=True)[::2]


def _trivia(rng: random.Random) -> list[dict]:
    """Chat-format rows, plus three malformed ones that ingestion must reject and count."""
    rows = []
    for task in ("reverse", "sort", "capitals"):
        for _ in range(100):
            r = _trivia_row(rng, task)
            rows.append({"messages": [{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": r["answer"]}],
                         "task": task, "quality": r["quality"]})
    rows.append({"messages": [{"role": "user", "content": "Reverse the letters a b"}], "task": "reverse",
                 "quality": "malformed"})  # no assistant turn
    rows.append({"messages": [{"role": "user", "content": "Sort c a"}, {"role": "assistant", "content": "  "}],
                 "task": "sort", "quality": "malformed"})  # empty response
    rows.append({"task": "sort", "quality": "malformed"})  # no messages at all
    return rows


def _unlabeled(rng: random.Random) -> list[dict]:
    rows = [_translation(rng, 3, "correct") for _ in range(100)]
    rows += [_translation(rng, 3, "wrong_answer") for _ in range(100)]
    rows += [_trivia_row(rng, "reverse") for _ in range(100)]
    rng.shuffle(rows)
    for r in rows:
        del r["task"]
    return rows


_GENERATORS = {"lexicon": _lexicon, "lexicon_cot": _lexicon_cot, "trivia": _trivia,
               "wrong_answers": _wrong_answers, "wrong_rationales": _wrong_rationales, "unlabeled": _unlabeled}
