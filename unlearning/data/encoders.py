"""Encoders of an evaluated subject: how a question and its answer become the token ids a model is scored on.

The probes ask an encoder for every sequence they score and every prompt they continue, naming the row each
belongs to. `QAEncoder` is the weights-only subject's: the template alone, the answer row as it was prepared
(the ids training saw). `ContextEncoder` is an in-context method's: each row's question after that row's
`Context`. Where context, question and answer exceed `max_length` (the model's window), demonstrations are
dropped, the last first, then the instruction; the answer is never cut for a context, and a sequence too
long without any is encoded as `QAEncoder` would (its answer cut at `max_length`, as at prepare time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unlearning.data.context import Context
from unlearning.data.tokenize import encode_prompts, encode_qa_many
from unlearning.errors import UserError
from unlearning.methods.logprobs import IGNORE_INDEX
from unlearning.schema import Template


class QAEncoder:
    """(question, answer) through the template, as prepare and training encode them."""

    def __init__(self, tokenizer: Any, template: Template, max_length: int):
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length

    def answer_row(self, index: int, row: dict[str, Any]) -> dict[str, list[int]]:
        """The sequence of row `index`'s own answer: its prepared ids."""
        return {k: list(row[k]) for k in ("input_ids", "labels")}

    def qa_many(self, items: Sequence[tuple[int, str, str]]) -> list[dict[str, list[int]]]:
        """Encoded (row index, question, answer) items."""
        return encode_qa_many(self.tokenizer, self.template, [(q, a) for _, q, a in items], self.max_length)

    def prompts(self, items: Sequence[tuple[int, str, str]]) -> list[list[int]]:
        """The prompts a greedy answer to each (row index, question, answer) item is generated from."""
        return encode_prompts(self.tokenizer, self.template, [q for _, q, _ in items])

    def summary(self) -> dict[str, Any] | None:
        return None


class ContextEncoder(QAEncoder):
    """Each question after its row's context (`contexts[i]` for row i), shortened to fit `max_length`."""

    def __init__(self, tokenizer: Any, template: Template, max_length: int, contexts: Sequence[Context]):
        super().__init__(tokenizer, template, max_length)
        self.contexts = list(contexts)
        self._fits: dict[tuple[int, str, int], list[int]] = {}  # (row, question, room) → its prompt
        self.shortened = self.demos_dropped = 0

    def answer_row(self, index: int, row: dict[str, Any]) -> dict[str, list[int]]:
        return self.qa_many([(index, row["question"], row["answer"])])[0]

    def _answer_ids(self, answers: Sequence[str]) -> list[list[int]]:
        chat = self.template.uses_chat(self.tokenizer)
        ids = self.tokenizer([self.template.answer_text(a, chat) for a in answers], add_special_tokens=False)
        return [[*a, self.tokenizer.eos_token_id] for a in ids["input_ids"]]

    def _fitted(self, index: int, question: str, room: int) -> list[int]:
        """The prompt of `question` after as much of row `index`'s context as leaves `room` tokens within
        `max_length`: every demonstration, then fewer from the end, then none, then no instruction either.
        Fitted once per (row, question, room): a greedy answer is generated after the prompt it is scored after."""
        key = (index, question, room)
        if key not in self._fits:
            context = self.contexts[index]
            tries = [context.shortened(k) for k in range(len(context.demos), -1, -1)]
            if context.instruction:
                tries.append(Context())
            for tried in tries:
                ids = encode_prompts(self.tokenizer, self.template, [question], [tried])[0]
                if len(ids) + room <= self.max_length or tried is tries[-1]:
                    break
            self._fits[key] = ids
            self.shortened += tried != context
            self.demos_dropped += len(context.demos) - len(tried.demos)
        return self._fits[key]

    def qa_many(self, items: Sequence[tuple[int, str, str]]) -> list[dict[str, list[int]]]:
        out = []
        for (index, question, _), answer in zip(items, self._answer_ids([a for _, _, a in items]), strict=True):
            prompt = self._fitted(index, question, len(answer))
            if len(prompt) >= self.max_length:
                raise UserError(f"the prompt of {question[:60]!r} takes {len(prompt)} tokens without any context, at "
                                f"least the window of {self.max_length}, leaving no answer token to score; raise "
                                "eval.context_length or shorten the question")
            ids = (prompt + answer)[:self.max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + answer)[:self.max_length]
            out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
        return out

    def prompts(self, items: Sequence[tuple[int, str, str]]) -> list[list[int]]:
        return [self._fitted(index, question, len(answer))
                for (index, question, _), answer in zip(items, self._answer_ids([a for _, _, a in items]),
                                                        strict=True)]

    def summary(self) -> dict[str, Any]:
        """How often the window shortened a context: the distinct prompts fitted, those shortened, the
        demonstrations dropped from them."""
        return {"max_length": self.max_length, "sequences": len(self._fits), "shortened": self.shortened,
                "demos_dropped": self.demos_dropped}
