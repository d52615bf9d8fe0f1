"""Sequence classifiers: log p(label | text) for a batch of texts, in one forward pass.

    from llmsample.hf.classify import classifier_log_probs

    logp = classifier_log_probs(model, tokenizer, ["a b", "c"], max_length=512)  # [2, L]

``model`` is a Hugging Face sequence classifier (``AutoModelForSequenceClassification``)
and ``tokenizer`` its tokenizer, with a pad token (texts are padded to a batch).
:class:`~llmsample.potentials.Classifier` scores through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["classifier_log_probs"]


def classifier_log_probs(model, tokenizer, texts: list[str], max_length: int = 512) -> Tensor:
    """[R, L] fp32 log-softmax of the classifier's logits on each text (truncated to
    ``max_length`` tokens), on the model's device. An empty text is all padding: it scores
    the same alone as in a batch with longer texts."""
    device = next(model.parameters()).device

    def encode(padding, length: int):
        return tokenizer(
            texts, return_tensors="pt", padding=padding, truncation=True, max_length=length
        )

    enc = encode(True, max_length)
    if enc["input_ids"].shape[-1] == 0:
        # every text is empty: one masked pad token each, what an empty text gets in a batch
        # with longer ones (no token at all is no input)
        enc = encode("max_length", 1)
    enc = enc.to(device)
    with torch.inference_mode():
        logits = model(**enc).logits.float()
    return torch.log_softmax(logits, dim=-1)
