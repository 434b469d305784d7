"""Unlearning methods: each a small loss function registered by name in `METHODS`.

A method's function takes `SequenceLogProbs` bundles (keyword `forget`, plus `idk` for methods that
contrast with a refusal) and its keyword-only hyper-parameters, and returns a scalar loss to minimise.
Registry metadata holds the method's default weights (`gamma` forget, `alpha` retain), its default retain
term, and whether it needs reference log-probs (`needs_ref`), which are computed once before training.
Retain terms live in `RETAIN_LOSSES`.
"""

from unlearning.registry import Registry

METHODS = Registry("method")
RETAIN_LOSSES = Registry("retain loss")

from unlearning.methods import finetune, ga, idkdpo, npo, retain, simnpo  # noqa: E402,F401  (registration)
