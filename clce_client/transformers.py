"""Hugging Face Transformers: a causal LM's loss computed by clce.

    import clce_client.transformers as clce_hf

    clce_hf.patch(model)                       # model(input_ids, labels=labels).loss is clce's
    Trainer(model, args, ..., compute_loss_func=clce_hf.causal_lm_loss)   # or only in Trainer

Both compute what transformers' ``ForCausalLMLoss`` computes: labels of -100 are ignored,
position t of the (B, T, V) logits is scored against label t + 1, and with ``num_items_in_batch``
(gradient accumulation: the Trainer counts the batch's tokens over all micro-batches) the loss is
the sum divided by that count. The logits are sent as they are, class dimension last, with
``shift=1``: the server does the shift, so the shifted copy of the logits never exists. The loss
runs as the operator ``clce::cross_entropy`` (`clce_client.ops`), so it works under autocast and
torch.compile too.

One difference from transformers: ``ForCausalLMLoss`` upcasts bfloat16/float16 logits to float32
(a copy of the whole tensor) before the loss; here they travel as they are and the loss comes back
in their dtype (the server accumulates in float32). Under autocast both compute in float32.

Transformers itself is never imported here: the hooks only need the model object and its outputs.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["patch", "unpatch", "causal_lm_loss", "loss_function"]


def _causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None, client=None):
    import torch

    from .ops import cross_entropy

    reduction = "sum" if num_items_in_batch is not None else "mean"
    if shift_labels is not None:      # the collator already shifted (padding-free, context parallel)
        target, shift = shift_labels, 0
    else:
        target, shift = labels, 1
    loss = cross_entropy(logits, target.to(logits.device), ignore_index=ignore_index, reduction=reduction,
                         shift=shift, classes_last=True, client=client)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def loss_function(logits, labels, vocab_size: int | None = None, num_items_in_batch=None, ignore_index: int = -100,
                  shift_labels=None, *, client=None, **kwargs: Any):
    """The signature of transformers' ``ForCausalLMLoss`` (what ``model.loss_function`` is
    called with), computed by clce. ``vocab_size`` is implied by the logits."""
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} classes, vocab_size is {vocab_size}")
    return _causal_lm_loss(logits, labels, num_items_in_batch, ignore_index, shift_labels, client)


def causal_lm_loss(outputs, labels, num_items_in_batch=None, *, client=None, ignore_index: int = -100):
    """For ``Trainer(..., compute_loss_func=causal_lm_loss)``: the causal LM loss of
    ``outputs.logits`` against ``labels``, normalised by ``num_items_in_batch`` when the Trainer
    gives it. ``functools.partial(causal_lm_loss, client=my_client)`` picks a client."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    return _causal_lm_loss(logits, labels, num_items_in_batch, ignore_index, None, client)


def patch(model, client=None):
    """Make ``model(input_ids, labels=labels).loss`` clce's. Works for models whose forward calls
    ``self.loss_function(logits=..., labels=..., vocab_size=..., **kwargs)`` (transformers' causal
    LMs since 4.46); returns the model."""
    loss_type = getattr(model, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise ValueError(f"clce_client.transformers.patch: {type(model).__name__} has loss_type {loss_type!r}; "
                         "only causal LM losses (ForCausalLM) are computed by clce")
    if not hasattr(type(model), "loss_function"):
        raise TypeError(f"{type(model).__name__} has no loss_function to replace (transformers >= 4.46 needed)")
    model.loss_function = functools.partial(loss_function, client=client)
    return model


def unpatch(model):
    """Undo `patch`: the model's own loss again."""
    model.__dict__.pop("_loss_function", None)
    return model
