"""Hugging Face Transformers on a real server: a tiny LlamaForCausalLM built from a config (no
downloads) trained under `Trainer` with gradient accumulation, once with the model's own loss and
once with clce's (`patch(model)` and `compute_loss_func=causal_lm_loss`). The losses and gradients
track the model's own step for step."""

from __future__ import annotations

import functools
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tests.support.serverproc import server_fixture  # noqa: E402

import clce_client  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import clce_client.transformers as clce_hf  # noqa: E402

VOCAB, SEQ, N_SAMPLES = 128, 16, 16
BATCH, ACCUM = 2, 2           # 4 optimizer steps over 16 samples, 2 micro-batches each
STEPS = N_SAMPLES // (BATCH * ACCUM)

server = server_fixture()


@pytest.fixture(scope="module")
def client(server):
    with clce_client.Client(server.url) as c:
        yield c


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def samples(seed=1):
    """Sequences with a learnable pattern; a masked prompt and a padded tail of varying length, so
    micro-batches hold different token counts and num_items_in_batch matters."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_SAMPLES):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        ids[1::2] = (ids[0::2] * 5 + 1) % VOCAB
        labels = ids.clone()
        prompt = int(torch.randint(1, 4, (), generator=g))
        length = int(torch.randint(SEQ // 2, SEQ + 1, (), generator=g))
        labels[:prompt] = -100
        labels[length:] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def train(tmp_path, name, *, patch_client=None, compute_loss_func=None):
    model = tiny_llama()
    if patch_client is not None:
        clce_hf.patch(model, client=patch_client)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=samples(),
                                   compute_loss_func=compute_loss_func)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    return losses, model


def max_rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_trainer_losses_track_the_models_own(client, tmp_path):
    local, local_model = train(tmp_path, "local")
    patched, patched_model = train(tmp_path, "patched", patch_client=client)
    func, _ = train(tmp_path, "func", compute_loss_func=functools.partial(clce_hf.causal_lm_loss, client=client))
    print(f"transformers Trainer: {STEPS} steps x {ACCUM} micro-batches; max rel. deviation of the loss: "
          f"patch {max_rel(patched, local):.2e}, compute_loss_func {max_rel(func, local):.2e}")
    # the loss moved: a test where nothing trains could not tell the losses apart
    assert local[-1] < local[0]
    assert patched == pytest.approx(local, rel=1e-5)
    assert func == pytest.approx(local, rel=1e-5)
    for (name, p), q in zip(local_model.named_parameters(), patched_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("num_items", [None, 37])
def test_patched_loss_and_gradients_equal_the_models_own(client, num_items):
    batch = samples(seed=3)[:4]
    ids = torch.stack([s["input_ids"] for s in batch])
    labels = torch.stack([s["labels"] for s in batch])
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    ref_model = tiny_llama()
    ref = ref_model(ids, labels=labels, **kw).loss
    ref.backward()

    model = clce_hf.patch(tiny_llama(), client=client)
    out = model(ids, labels=labels, **kw)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)

    clce_hf.unpatch(model)
    assert model.loss_function is ref_model.loss_function   # transformers' own again


def test_shift_labels_from_the_collator(client):
    """A collator that already shifted (padding-free training) passes shift_labels: no shift then."""
    model = tiny_llama()
    batch = samples(seed=4)[:2]
    ids = torch.stack([s["input_ids"] for s in batch])
    labels = torch.stack([s["labels"] for s in batch])
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        ref = model(ids, labels=labels).loss
        clce_hf.patch(model, client=client)
        got = model(ids, labels=labels, shift_labels=shift_labels).loss
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_patch_refuses_other_losses():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3)
    model = transformers.LlamaForSequenceClassification(cfg)
    with pytest.raises(ValueError, match="only causal LM losses"):
        clce_hf.patch(model)
