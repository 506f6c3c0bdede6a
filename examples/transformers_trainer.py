"""Hugging Face Transformers with clce's loss: a tiny LlamaForCausalLM (built from a config, no
downloads) trained by `Trainer` with gradient accumulation.

    CLCE_URL=http://127.0.0.1:8000 python examples/transformers_trainer.py

Two ways, each one line:
  * ``clce_client.transformers.patch(model)``: ``model(input_ids, labels=labels).loss`` is clce's;
  * ``Trainer(..., compute_loss_func=clce_client.transformers.causal_lm_loss)``.
Both send the (B, T, V) logits as they are (the server does the shift) and normalise by the
Trainer's ``num_items_in_batch``. The model's own loss is the reference, step for step.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import clce_client  # noqa: E402
import clce_client.transformers as clce_hf  # noqa: E402

VOCAB, SEQ, SAMPLES, BATCH, ACCUM = 128, 24, 24, 2, 3
STEPS = SAMPLES // (BATCH * ACCUM)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def dataset():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(SAMPLES):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        ids[1::2] = (ids[0::2] * 5 + 1) % VOCAB
        labels = ids.clone()
        labels[: int(torch.randint(1, 6, (), generator=g))] = -100               # the prompt
        labels[int(torch.randint(SEQ // 2, SEQ + 1, (), generator=g)):] = -100     # the padding
        out.append({"input_ids": ids, "labels": labels})
    return out


def train(model, out_dir, **trainer_kwargs):
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), **trainer_kwargs)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main():
    transformers.logging.set_verbosity_error()
    with clce_client.Client(os.environ.get("CLCE_URL", clce_client.DEFAULT_URL)) as client, \
            tempfile.TemporaryDirectory() as tmp:
        local = train(tiny_llama(), tmp)
        patched = train(clce_hf.patch(tiny_llama(), client=client), tmp)
        func = train(tiny_llama(), tmp,
                     compute_loss_func=functools.partial(clce_hf.causal_lm_loss, client=client))
    dev = {name: max(abs(a - b) / abs(b) for a, b in zip(run, local))
           for name, run in (("patch", patched), ("compute_loss_func", func))}
    print(f"Transformers Trainer: {STEPS} steps x {ACCUM} micro-batches, loss {local[0]:.4f} -> {local[-1]:.4f}; "
          f"max rel. deviation from the model's own loss: " + ", ".join(f"{k} {v:.2e}" for k, v in dev.items()))
    assert len(local) == len(patched) == len(func) == STEPS and max(dev.values()) < 1e-5
    print("RESULT " + json.dumps({"integration": "transformers", "steps": STEPS, "accumulation": ACCUM,
                                  "max_rel_loss_dev": max(dev.values())}))


if __name__ == "__main__":
    main()
