"""Alternative answers to the forget questions, written by the target model itself (AltPO).

AltPO (Mekala et al. 2024) prefers, over each true forget answer, a plausible answer that states other
facts. The paper asks an instruction-tuned target to rewrite the answer; a model that cannot follow
instructions (the embedded tiny model) is asked the question instead and sampled until it says something
other than the true answer. Either way the alternatives come from the target's own distribution, so the
preference pulls the model toward answers it already finds fluent. A question with no usable sample falls
back to one of the row's perturbed answers, then to a refusal; the counts of each are recorded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from unlearning.data.pairing import refusal
from unlearning.data.tokenize import encode_prompts
from unlearning.evaluate.probes import decode_until_eos
from unlearning.schema import Template

INSTRUCTION = ("Below is a question and its answer. Write another answer to the same question that sounds just as "
               "plausible but replaces every fact the given answer states with a different one. Reply with the new "
               "answer only.\n\nQuestion: {question}\nAnswer: {answer}")


def normalise(text: str) -> str:
    """Lower case, punctuation and extra spaces dropped: how two answers are compared."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def choose(answer: str, candidates: Sequence[str], fallbacks: Sequence[str]) -> tuple[str, str]:
    """The first candidate that is not empty and differs from `answer`, else the first usable fallback.

    Returns:
        (alternative, source): source is "generated", "perturbed" or "refusal".
    """
    for text in candidates:
        if normalise(text) and normalise(text) != normalise(answer):
            return text.strip(), "generated"
    for text in fallbacks[:-1]:
        if normalise(text) != normalise(answer):
            return text, "perturbed"
    return fallbacks[-1], "refusal"


@torch.inference_mode()
def sample(model: Any, tokenizer: Any, prompts: Sequence[list[int]], *, tries: int, temperature: float,
           max_new_tokens: int, seed: int, batch_size: int = 16) -> list[list[str]]:
    """`tries` sampled continuations of each prompt (token ids), decoded up to EOS, in input order."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        torch.manual_seed(seed + start)  # the same alternatives for the same model, data and seed
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_k=0, num_return_sequences=tries, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        texts = [decode_until_eos(tokenizer, row) for row in gen[:, width:].tolist()]
        out += [texts[i * tries:(i + 1) * tries] for i in range(len(chunk))]
    return out


def alternatives(model: Any, tokenizer: Any, template: Template, forget: Sequence[dict[str, Any]], *,
                 instruct: bool, tries: int, temperature: float, max_new_tokens: int, seed: int
                 ) -> list[dict[str, str]]:
    """One alternative answer per forget row, in order: {"question", "answer", "alternate", "source"}."""
    asked = [INSTRUCTION.format(question=r["question"], answer=r["answer"]) if instruct else r["question"]
             for r in forget]
    samples = sample(model, tokenizer, encode_prompts(tokenizer, template, asked), tries=tries,
                     temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    out = []
    for i, (row, candidates) in enumerate(zip(forget, samples, strict=True)):
        perturbed = row.get("perturbed_answer") or []
        perturbed = [perturbed] if isinstance(perturbed, str) else list(perturbed)
        text, source = choose(row["answer"], candidates, [*perturbed, refusal(seed, i)])
        out.append({"question": row["question"], "answer": row["answer"], "alternate": text, "source": source})
    return out
