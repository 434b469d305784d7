"""Text corpora as training and evaluation data: documents chunked into sequences scored on every token.

MUSE-style forget and retain sets are raw text (news articles, a book), not QA pairs. Each split's documents are
tokenized without special tokens, each followed by EOS, and concatenated into one stream, which is cut into
chunks of `max_length` tokens (the BOS a tokenizer adds first, where it adds one). Every stream token is the
label of exactly one chunk position, so the chunks together score the corpus once: no token lost or counted
twice, and the EOS after a document teaches where it ends. A chunk row has the QA rows' fields (`input_ids`,
`labels` over every token, `attention_mask`), its decoded `text`, and `question` "" / `answer` = its text, so
every method and metric that reads answer tokens reads the whole chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unlearning.methods.logprobs import IGNORE_INDEX


def is_text(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether a split's records (or prepared rows) are text documents / chunks rather than QA pairs."""
    return bool(rows) and bool(rows[0].get("text")) and not rows[0].get("question")


def token_stream(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """The documents' tokens back to back, an EOS after each."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]


def _bos(tokenizer: Any) -> list[int]:
    """The BOS the tokenizer puts before a text, if it adds one."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def chunk_documents(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[dict[str, Any]]:
    """The documents as chunk rows of at most `max_length` tokens (see the module docstring); the last chunk
    holds what is left. Each row: `input_ids`, `labels` (every stream token; the BOS unscored),
    `attention_mask`, `text` (the chunk decoded without special tokens), `question` "", `answer` = `text`."""
    bos = _bos(tokenizer)
    width = max_length - len(bos)
    if width < 2:
        raise ValueError(f"data.max_length={max_length} leaves no room to chunk text into")
    stream = token_stream(tokenizer, texts)
    rows = []
    for start in range(0, len(stream), width):
        part = stream[start:start + width]
        text = tokenizer.decode(part, skip_special_tokens=True).strip()
        rows.append({"input_ids": bos + part, "labels": [IGNORE_INDEX] * len(bos) + part,
                     "attention_mask": [1] * (len(bos) + len(part)), "text": text, "question": "", "answer": text})
    return rows
