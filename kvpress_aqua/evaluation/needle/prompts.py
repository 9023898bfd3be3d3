"""Needle prompts of an exact token length: instruction, haystack with the needles spliced in, question, answer prefix.

The prompt is a chat-formatted instruction, ``length`` minus the overhead tokens of haystack text
with the task's needle (and any distractors) spliced in at ``depth`` percent, each at a sentence
break, the question, and the start of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...data.haystack import Haystack
from .tasks import TaskInstance

__all__ = ["Prompt", "PromptBuilder"]


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
            copies = n // len(ids) + 2
            while len(ids) < n:  # a short text, repeated (the seams may merge tokens: grow until enough)
                ids = self.tokenizer.encode((text.strip() + " ") * copies, add_special_tokens=False)
                copies *= 2
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
