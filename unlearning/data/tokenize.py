"""Tokenizers and QA encoding with answer-only labels.

`encode_qa` renders a QA pair through the template (or the tokenizer's chat template), appends EOS and
sets every prompt position's label to `IGNORE_INDEX`, so losses and metrics see answer tokens only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from unlearning.data.context import Context
from unlearning.errors import UserError
from unlearning.methods.logprobs import IGNORE_INDEX
from unlearning.schema import Template

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer on `texts`; returns a `PreTrainedTokenizerFast` that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Load a model's tokenizer (a GGUF file's from its converted checkpoint); give it a pad token (EOS) when it
    has none."""
    from transformers import AutoTokenizer

    from unlearning.checkpoints import checkpoint_dir, offline_hint

    try:
        tok = AutoTokenizer.from_pretrained(checkpoint_dir(name_or_path), trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as e:
        raise UserError(offline_hint(name_or_path) or (
            f"could not load a tokenizer from {name_or_path!r}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}; set data.tokenizer.name to a valid tokenizer name or "
            "path")) from e
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {name_or_path!r} has no EOS token; answers must end with one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _ids(encoded: Any) -> list[int]:
    # transformers may return a list or a BatchEncoding depending on the call and version.
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def encode_prompts(tokenizer: Any, template: Template, questions: Sequence[str],
                   contexts: Sequence[Context] | None = None) -> list[list[int]]:
    """Token ids of the prompt that precedes each answer (BOS included when the tokenizer adds one), ending with
    the template's `response_prefix` when it has one; with `contexts` (one per question), each question comes
    after its context's instruction and demonstrations, rendered as earlier turns of the same template (a
    system message and user / assistant turns under a chat template)."""
    if not questions:
        return []
    contexts = contexts or [Context()] * len(questions)
    if template.uses_chat(tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("data.template.chat=true but the tokenizer has no chat template; set it to false")
        prefix = _ids(tokenizer(template.response_prefix, add_special_tokens=False)) if template.response_prefix else []
        return [_ids(tokenizer.apply_chat_template(_messages(template, c, q), add_generation_prompt=True,
                                                   tokenize=True)) + prefix for q, c in zip(questions, contexts,
                                                                                             strict=True)]
    texts = [_context_text(template, c) + template.prompt.format(question=q)
             + (f" {template.response_prefix}" if template.response_prefix else "")
             for q, c in zip(questions, contexts, strict=True)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def _context_text(template: Template, context: Context) -> str:
    """A context as plain text before a prompt: the instruction, then each demonstration as the template renders
    a question and its answer, a blank line after each."""
    shown = [template.prompt.format(question=q) + template.answer_text(a, chat=False) for q, a in context.demos]
    return "".join(f"{part}\n\n" for part in [context.instruction, *shown] if part)


def _messages(template: Template, context: Context, question: str) -> list[dict[str, str]]:
    """A context and a question as chat messages: a system message (the instruction), a user / assistant turn per
    demonstration, the question's user turn."""
    prefix = template.response_prefix
    messages = [{"role": "system", "content": context.instruction}] if context.instruction else []
    for q, a in context.demos:
        messages += [{"role": "user", "content": q},
                     {"role": "assistant", "content": f"{prefix}{template.answer_text(a, chat=True)}"}]
    return [*messages, {"role": "user", "content": question}]


def encode_prompt(tokenizer: Any, template: Template, question: str) -> list[int]:
    """Token ids of one prompt (see `encode_prompts`)."""
    return encode_prompts(tokenizer, template, [question])[0]


def encode_qa_many(tokenizer: Any, template: Template, pairs: Sequence[tuple[str, str]], max_length: int
                   ) -> list[dict[str, list[int]]]:
    """Encode (question, answer) pairs, one tokenizer call for all prompts and one for all answers.

    Returns:
        per pair: `input_ids` = prompt + answer + EOS (truncated to `max_length`), `labels` equal to it
        on the answer and EOS positions and `IGNORE_INDEX` on the prompt, and `attention_mask` of ones.
    """
    if not pairs:
        return []
    questions = list(dict.fromkeys(q for q, _ in pairs))  # each distinct prompt encoded once
    prompts = dict(zip(questions, encode_prompts(tokenizer, template, questions), strict=True))
    chat = template.uses_chat(tokenizer)
    answers = tokenizer([template.answer_text(a, chat) for _, a in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for (q, _), answer in zip(pairs, answers, strict=True):
        answer_ids = [*answer, tokenizer.eos_token_id]
        prompt = prompts[q]
        if len(prompt) >= max_length:
            raise UserError(f"the prompt of {q[:60]!r} takes {len(prompt)} tokens, at least data.max_length="
                            f"{max_length}, leaving no answer token to score; raise data.max_length or shorten it")
        ids = (prompt + answer_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + answer_ids)[:max_length]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return out


def encode_qa(tokenizer: Any, template: Template, question: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Encode one QA pair (see `encode_qa_many`)."""
    return encode_qa_many(tokenizer, template, [(question, answer)], max_length)[0]


def collate(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into (B, T) tensors; padding is masked in the labels."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
