"""Hugging Face Transformers: a causal LM's loss computed by clce, in either of its two ways.

    import clce_client.transformers as clce_hf

    clce_hf.patch(model)                       # model(input_ids, labels=labels).loss is clce's
    Trainer(model, args, ..., compute_loss_func=clce_hf.causal_lm_loss)   # or only in Trainer
    clce_hf.patch_linear(model, client)        # lm_head + loss fused: hidden states travel, not logits

Each computes what transformers' ``ForCausalLMLoss`` computes: labels of -100 are ignored,
position t of the (B, T, V) logits is scored against label t + 1 (or the collator's
``shift_labels``), and with ``num_items_in_batch`` (gradient accumulation: the Trainer counts the
batch's tokens over all micro-batches) the loss is the sum divided by that count.

The loss (`patch`, `causal_lm_loss`): the logits are sent as they are, class dimension last, with
``shift=1``: the server does the shift, so the shifted copy of the logits never exists. The loss
runs as the operator ``clce::cross_entropy`` (`clce_client.ops`), so it works under autocast and
torch.compile too. One difference from transformers: ``ForCausalLMLoss`` upcasts
bfloat16/float16 logits to float32 (a copy of the whole tensor) before the loss; here they travel
as they are and the loss comes back in their dtype (the server accumulates in float32). Under
autocast both compute in float32.

The fused linear cross-entropy (`patch_linear`, as Liger-Kernel's
``fused_linear_cross_entropy=True``): a forward with ``labels`` runs the decoder, then sends its
last hidden states with the head's weight to the server, and the (B, T, V) logits never exist, on
the client or the server; such a forward returns ``logits=None``. A forward without labels
(evaluation, generation) is the model's own. The head's weight is stored on the server once per
version (an optimizer step makes the next); on shared memory (``share=True``, the default) it is
first moved into memory shared with the server, which then reads each version where it lies: no
copy at all. Its gradient comes back with each call (default), through autograd, so gradient
clipping, DDP and optimizers see it as usual; or, with ``accumulate=True``, accumulates on the
server over the micro-batches, and ``flush_callback(model)`` (a TrainerCallback) brings it into
``.grad`` before the optimizer step. The Trainer clips gradients before that callback runs, so
that mode needs ``max_grad_norm=0``.

Transformers itself is imported only by `patch_linear` and `flush_callback`: the loss hooks only
need the model object and its outputs.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["patch", "patch_linear", "unpatch", "causal_lm_loss", "loss_function", "flush_callback"]


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


def patch_linear(model, client=None, *, accumulate: bool = False, weight_name: str | None = None, share: bool = True,
          replay: bool = True):
    """Replace ``model``'s forward for labelled batches (models with ``get_decoder()`` and
    ``get_output_embeddings()``: transformers' causal LMs); returns the model. ``replay`` (with
    ``accumulate``): keep each micro-batch's hidden states until the flush, to replay what a
    server restart lost; False keeps nothing and the flush raises AccumulationLost instead
    (docs/integrations/linear_cross_entropy.md)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .client import default_client
    from .linear import linear_cross_entropy, share_weight

    if getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        raise ValueError(f"clce_client.transformers.patch_linear: {type(model).__name__} has loss_type "
                         f"{model.loss_type!r}; only causal LM losses (ForCausalLM) are fused")
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no decoder and linear output embeddings to fuse")
    own_forward = model.forward
    cl = client or default_client()
    unshared = [share]     # moved into shared memory at the first labelled forward (the server is up then)

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs: Any):
        if labels is None:
            return own_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep,
                               **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if unshared[0]:
            unshared[0] = False
            share_weight(head.weight, cl)
        target, shift = (shift_labels, 0) if shift_labels is not None else (labels, 1)
        loss = linear_cross_entropy(hidden, head.weight, target.to(hidden.device), getattr(head, "bias", None),
                                    client=cl, ignore_index=ignore_index,
                                    reduction="sum" if num_items is not None else "mean", shift=shift,
                                    weight_name=weight_name, accumulate=accumulate)
        if num_items is not None:
            if hasattr(num_items, "to"):
                num_items = num_items.to(loss.device)
            loss = loss / num_items
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states,
                                      attentions=out.attentions)

    model.forward = forward
    if accumulate:
        cl.weights.replay = replay
    model._clce_linear = (own_forward, cl.weights if accumulate else None)
    return model


def unpatch(model):
    """Undo `patch` or `patch_linear`: the model's own loss and forward again."""
    model.__dict__.pop("_loss_function", None)
    if model.__dict__.pop("_clce_linear", None) is not None:
        model.__dict__.pop("forward", None)
    return model


def flush_callback(model):
    """A TrainerCallback that takes the server-accumulated head gradient into ``.grad`` before
    each optimizer step (``patch_linear(..., accumulate=True)``; needs ``max_grad_norm=0``)."""
    from transformers import TrainerCallback

    weights = model._clce_linear[1]
    if weights is None:
        raise ValueError("flush_callback: the model was patched without accumulate=True")

    class _Flush(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if args.max_grad_norm and args.max_grad_norm > 0:
                raise ValueError("accumulate=True: the Trainer clips gradients before the head's gradient "
                                 "is brought back; set max_grad_norm=0 (or use the stateless mode)")

        def on_pre_optimizer_step(self, args, state, control, **kw):
            weights.flush()

    return _Flush()
