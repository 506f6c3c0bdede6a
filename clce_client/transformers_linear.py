"""Hugging Face Transformers: a causal LM's lm_head + loss replaced by clce's fused linear
cross-entropy, as Liger-Kernel's ``fused_linear_cross_entropy=True`` patch does.

    import clce_client.transformers_linear as clce_lce

    clce_lce.patch(model, client)                 # training forwards send hidden states, not logits
    Trainer(model, args, ...)                     # the model's own loss, computed remotely

A forward with ``labels`` runs the decoder, then sends its last hidden states with the head's
weight to the server, which computes what ``ForCausalLMLoss`` computes (labels of -100 ignored,
position t scored against label t + 1, or the collator's ``shift_labels``; with the Trainer's
``num_items_in_batch``, the sum divided by it) without the (B, T, V) logits ever existing, on
the client or the server. Such a forward returns ``logits=None``. A forward without labels
(evaluation, generation) is the model's own.

The head's weight is stored on the server once per version (an optimizer step makes the next);
on shared memory (``share=True``, the default) it is first moved into memory shared with the
server, which then reads each version where it lies: no copy at all. Its gradient:
  * comes back with each call (default), through autograd, so gradient clipping, DDP and
    optimizers see it as usual;
  * with ``accumulate=True``, accumulates on the server over the micro-batches;
    ``flush_callback(model)`` (a TrainerCallback) brings it into ``.grad`` before the optimizer
    step. The Trainer clips gradients before that callback runs, so this mode needs
    ``max_grad_norm=0``.

Transformers is imported only when `patch` runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["patch", "unpatch", "flush_callback"]


def patch(model, client=None, *, accumulate: bool = False, weight_name: str | None = None, share: bool = True,
          replay: bool = True):
    """Replace ``model``'s forward for labelled batches (models with ``get_decoder()`` and
    ``get_output_embeddings()``: transformers' causal LMs); returns the model. ``replay`` (with
    ``accumulate``): keep each micro-batch's hidden states until the flush, to replay what a
    server restart lost; False keeps nothing and the flush raises AccumulationLost instead
    (docs/integrations/linear_cross_entropy.md)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .client import default_client
    from .linear import linear_cross_entropy, share_weight, weights_of

    if getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        raise ValueError(f"clce_client.transformers_linear.patch: {type(model).__name__} has loss_type "
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
        weights_of(cl).replay = replay
    model._clce_linear = (own_forward, weights_of(cl) if accumulate else None)
    return model


def unpatch(model):
    """Undo `patch`: the model's own forward again."""
    own = model.__dict__.pop("_clce_linear", None)
    if own is not None:
        model.__dict__.pop("forward", None)
    return model


def flush_callback(model):
    """A TrainerCallback that takes the server-accumulated head gradient into ``.grad`` before
    each optimizer step (``patch(..., accumulate=True)``; needs ``max_grad_norm=0``)."""
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
