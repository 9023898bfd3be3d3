"""Needle tasks and the grid of cells: what is hidden, what is asked, how it is scored.

Light on purpose (no torch): the CLI's parser reads :data:`TASKS` and :data:`PROTOCOLS` from here.
The runner, :mod:`kvpress_aqua.evaluation.needle.runner`, documents the harness.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "MULTIKEY_DISTRACTORS",
    "MULTIVALUE_VALUES",
    "PROTOCOLS",
    "TASKS",
    "Cell",
    "TaskInstance",
    "cell_rng",
    "make_task",
    "parse_depths",
    "plan_cells",
    "score_answer",
]

PROTOCOLS = ("query-aware", "context-first")
TASKS = ("passkey", "single", "multikey", "multivalue")
MULTIKEY_DISTRACTORS = 3
MULTIVALUE_VALUES = 4

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "misty", "noble", "olive", "proud", "quiet", "rusty", "silver", "tidy", "urban", "vivid", "wild", "young",
)
_NOUNS = (
    "anchor", "badger", "canyon", "dragon", "ember", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel", "violin", "walrus",
)
_MAGIC_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)



# ---------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskInstance:
    """One needle task with its random values drawn.

    Attributes
    ----------
    task : str
        One of :data:`TASKS`.
    instruction : str
        Text before the haystack.
    needle : str
        Sentences inserted at the cell's depth (all values of ``multivalue``).
    distractors : tuple of (float, str)
        Other needles and the depth (percent) each is inserted at (``multikey``).
    question : str
        Text after the haystack.
    answer_prefix : str
        Start of the assistant's answer, given in the prompt (empty for passkey: this wording made SmolLM2 ramble).
    expected : tuple of str
        Values that must appear in the answer.
    max_new_tokens : int
        Tokens to generate (enough for the expected values).

    """

    task: str
    instruction: str
    needle: str
    distractors: tuple[tuple[float, str], ...]
    question: str
    answer_prefix: str
    expected: tuple[str, ...]
    max_new_tokens: int


def _magic_key(rng: random.Random, taken: Iterable[str] = ()) -> str:
    taken = set(taken)
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            return key


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def make_task(task: str, rng: random.Random) -> TaskInstance:
    """Draw a task's keys and values from ``rng``.

    Parameters
    ----------
    task : str
        ``passkey`` (a 5-digit pass key in the passkey-retrieval wording), ``single`` (one RULER
        "special magic number" for a word key), ``multikey`` (the same plus
        :data:`MULTIKEY_DISTRACTORS` needles for other keys at random depths) or ``multivalue``
        (:data:`MULTIVALUE_VALUES` numbers for one key, all to be recalled).
    rng : random.Random
        Source of the values (seeded per cell by :func:`cell_rng`).

    Returns
    -------
    TaskInstance

    """
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        return TaskInstance(
            task,
            "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the pass key.",
            f"The pass key is {key}. Remember it. {key} is the pass key.",
            (),
            "What is the pass key? Answer with the number only.",
            "",
            (key,),
            14,
        )
    if task not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; use one of {', '.join(TASKS)}")
    key = _magic_key(rng)
    if task == "multivalue":
        values = []
        while len(values) < MULTIVALUE_VALUES:
            value = str(rng.randint(1000000, 9999999))
            if value not in values:
                values.append(value)
        return TaskInstance(
            task, _MAGIC_INSTRUCTION, " ".join(_magic(key, v) for v in values), (),
            f"What are all the special magic numbers for {key} mentioned in the provided text?",
            f"The special magic numbers for {key} mentioned in the provided text are",
            tuple(values), 48,
        )
    value = str(rng.randint(1000000, 9999999))
    distractors: list[tuple[float, str]] = []
    if task == "multikey":
        keys = [key]
        for _ in range(MULTIKEY_DISTRACTORS):
            keys.append(_magic_key(rng, keys))
            distractors.append((rng.uniform(0, 100), _magic(keys[-1], str(rng.randint(1000000, 9999999)))))
    return TaskInstance(
        task, _MAGIC_INSTRUCTION, _magic(key, value), tuple(distractors),
        f"What is the special magic number for {key} mentioned in the provided text?",
        f"The special magic number for {key} mentioned in the provided text is",
        (value,), 16,
    )


def cell_rng(seed: int, task: str, length: int, depth: float) -> random.Random:
    """The random source of one (task, length, depth): the same needle for every policy and protocol."""
    return random.Random(f"{seed}:{task}:{length}:{depth:g}")


def score_answer(answer: str, expected: Sequence[str]) -> float:
    """Exact-match score: the fraction of expected values found in ``answer`` as whole numbers.

    Parameters
    ----------
    answer : str
        The generated text.
    expected : sequence of str
        Values to find (digits); ``12345`` inside ``9123456`` does not count.

    Returns
    -------
    float
        In ``[0, 1]``; 1 or 0 for single-value tasks.

    """
    found = sum(bool(re.search(rf"(?<!\d){re.escape(value)}(?!\d)", answer)) for value in expected)
    return found / len(expected)


# ---------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One point of the grid; ``key`` identifies it in a results file."""

    policy: str
    protocol: str
    task: str
    length: int
    depth: float

    def key(self) -> tuple[str, str, str, int, float]:
        """``(policy, protocol, task, length, depth)``."""
        return (self.policy, self.protocol, self.task, self.length, round(self.depth, 3))


def parse_depths(text: str) -> list[float]:
    """Parse ``start:stop:count`` (evenly spaced, both ends included) or a comma list of percentages.

    Examples
    --------
    >>> parse_depths("0:100:5")
    [0.0, 25.0, 50.0, 75.0, 100.0]
    >>> parse_depths("10,50")
    [10.0, 50.0]

    """
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            n = int(count)
            if n < 1:
                raise ValueError
            values = [float(start)] if n == 1 else [
                float(start) + (float(stop) - float(start)) * i / (n - 1) for i in range(n)
            ]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"depths {text!r}: give start:stop:count (e.g. 0:100:10) or a list (e.g. 0,50,100)") from None
    values = [round(v, 1) for v in values]
    if not values or any(not 0 <= v <= 100 for v in values):
        raise ValueError(f"depths {text!r}: percentages must be in [0, 100]")
    return values


def plan_cells(
    policies: Sequence[str], protocols: Sequence[str], tasks: Sequence[str], lengths: Sequence[int],
    depths: Sequence[float],
) -> list[Cell]:
    """Every cell of the grid, in run order (policy, protocol, task, length, depth)."""
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown needle task {task!r}; use one of {', '.join(TASKS)}")
    return [Cell(p, r, t, n, d) for p in policies for r in protocols for t in tasks for n in lengths for d in depths]
