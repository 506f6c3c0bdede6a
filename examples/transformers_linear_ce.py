"""Hugging Face Transformers with clce's fused linear cross-entropy: a tiny LlamaForCausalLM
(built from a config, no downloads) trained by `Trainer` with gradient accumulation, its lm_head
+ loss replaced so that only hidden states travel (``clce_client.transformers.patch_linear``).

    CLCE_URL=http://127.0.0.1:8000 python examples/transformers_linear_ce.py

Three runs from the same initial model: the model's own loss (the reference), the patch in its
default mode (the head's weight stored on the server once per version, its gradient back with
every call, through autograd), and with ``accumulate=True`` (the gradient summed on the server
and brought back by ``flush_callback`` before each optimizer step). The losses track step for step.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import clce_client  # noqa: E402
import clce_client.transformers as clce_hf  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from transformers_trainer import ACCUM, BATCH, STEPS, dataset, tiny_llama  # noqa: E402


def train(model, out_dir, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, disable_tqdm=True, max_grad_norm=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main():
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    with clce_client.Client(os.environ.get("CLCE_URL", clce_client.DEFAULT_URL)) as client, \
            tempfile.TemporaryDirectory() as tmp:
        local = train(tiny_llama(), tmp)
        per_call = train(clce_hf.patch_linear(tiny_llama(), client), tmp)
        model = clce_hf.patch_linear(tiny_llama(), client, accumulate=True)
        accumulated = train(model, tmp, callbacks=[clce_hf.flush_callback(model)])
    dev = {name: max(abs(a - b) / abs(b) for a, b in zip(run, local))
           for name, run in (("per-call gradient", per_call), ("accumulate", accumulated))}
    print(f"Transformers Trainer, fused linear cross-entropy: {STEPS} steps x {ACCUM} micro-batches, loss "
          f"{local[0]:.4f} -> {local[-1]:.4f}; max rel. deviation from the model's own loss: "
          + ", ".join(f"{k} {v:.2e}" for k, v in dev.items()))
    assert len(local) == len(per_call) == len(accumulated) == STEPS and max(dev.values()) < 1e-5
    print("RESULT " + json.dumps({"integration": "transformers_linear", "steps": STEPS, "accumulation": ACCUM,
                                  "max_rel_loss_dev": max(dev.values())}))


if __name__ == "__main__":
    main()
