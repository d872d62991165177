"""Gradient checkpointing (same losses and gradients, activations recomputed), the numerical guards
(on_nonfinite: abort | skip, max_skipped_steps) with NaN injected into the loss or the gradients, sft_weight's NLL
term in the loss, and a bf16 autocast step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.pack import pack
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.errors import AlignkitError
from alignkit.losses import build_options, get_loss
from alignkit.models.logprobs import response_logprobs
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train import loop
from alignkit.train.logging import read_metrics
from alignkit.train.method import Method
from alignkit.train.packing import Packing
from alignkit.train.reference import Reference, reference_logps
from alignkit.train.step import autocast

TOKENIZER = build_word_tokenizer(VOCABULARY)


def tiny_llama():
    return build_tiny_model("llama", len(TOKENIZER), seed=0, hidden=32, layers=2, heads=4)


@pytest.fixture
def data(tmp_path) -> str:
    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(32, seed=9))
    return str(tmp_path / "pairs.jsonl")


def config(tmp_path, data: str, name: str, **values) -> TrainConfig:
    settings = dict(model="tiny", train_data=data, output_dir=str(tmp_path / name), loss="dpo", learning_rate=2e-3,
                    ref_cache=False, max_length=64, max_tokens_per_row=512, max_tokens_per_batch=160, max_steps=4,
                    progress=False)
    return TrainConfig(**{**settings, **values})


# ---- gradient checkpointing ----


def test_gradient_checkpointing_same_gradients_fewer_saved_activations(data):
    batch = pack(prepare_examples(data, TOKENIZER, ExampleSettings("pairs", 64))[:8], max_tokens_per_row=512)
    grads, saved = [], []
    for checkpointing in (False, True):
        model = tiny_llama().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        count = [0]

        def pack_hook(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
            out = response_logprobs(model, batch)
        (out.seq_logps[:, 0] - out.seq_logps[:, 1]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        saved.append(count[0])
    assert saved[1] < saved[0] / 3  # the decoder layers keep only their inputs; the rest is recomputed
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-7, msg=name)


def test_gradient_checkpointing_option_trains_the_same(tmp_path, data):
    plain = loop.train(config(tmp_path, data, "plain", max_steps=2), tiny_llama(), TOKENIZER)
    ckpt = loop.train(config(tmp_path, data, "ckpt", max_steps=2, gradient_checkpointing=True), tiny_llama(), TOKENIZER)
    assert ckpt.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-7) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
    for (name, a), b in zip(plain.model.state_dict().items(), ckpt.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


# ---- non-finite loss or gradients ----


def nan_loss_in_steps(monkeypatch, steps: set[int]) -> None:
    """Method.forward returns NaN losses in the given steps (one micro-batch per step in these configs)."""
    real, calls = Method.forward, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses, metrics = real(*args, **kwargs)
        return (losses * float("nan") if calls["n"] in steps else losses), metrics

    monkeypatch.setattr(Method, "forward", poisoned)


def test_nan_loss_aborts_by_default_and_writes_no_final_model(tmp_path, data, monkeypatch):
    nan_loss_in_steps(monkeypatch, {2})
    with pytest.raises(AlignkitError) as err:
        loop.train(config(tmp_path, data, "abort"), tiny_llama(), TOKENIZER)
    assert str(err.value).startswith("step 2: loss is nan;") and "on_nonfinite: skip" in str(err.value)
    assert [r["step"] for r in read_metrics(tmp_path / "abort")] == [1]
    assert not (tmp_path / "abort" / "final").exists()


def test_nan_gradient_aborts(tmp_path, data):
    model = tiny_llama()
    model.model.norm.weight.register_hook(lambda grad: grad * float("nan"))  # finite loss, NaN gradient
    with pytest.raises(AlignkitError, match=r"^step 1: gradient norm is nan;"):
        loop.train(config(tmp_path, data, "grad"), model, TOKENIZER)


def test_skip_drops_the_step_and_goes_on(tmp_path, data, monkeypatch, caplog):
    nan_loss_in_steps(monkeypatch, {2})
    cfg = config(tmp_path, data, "skip", on_nonfinite="skip", max_skipped_steps=1, save_every=1, keep_last=10)
    result = loop.train(cfg, tiny_llama(), TOKENIZER)
    rows = read_metrics(tmp_path / "skip")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["skipped"] == 1 and rows[1]["skipped_steps"] == 1 and "loss" not in rows[1]
    assert all(math.isfinite(r["loss"]) and "skipped" not in r for r in rows[::2] + rows[3:])
    assert "step 2: loss is nan; step skipped" in caplog.text
    # no update in step 2: its checkpoint holds the weights of step 1; the schedule still moved on
    checkpoints = tmp_path / "skip" / "checkpoints"
    one, two = (load_file(checkpoints / f"step-0000000{s}" / "model.safetensors") for s in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert rows[1]["lr"] < rows[0]["lr"]
    assert result.final_metrics["loss"] == rows[-1]["loss"]


def test_skip_aborts_past_max_skipped_steps(tmp_path, data, monkeypatch):
    nan_loss_in_steps(monkeypatch, {2, 3, 4})
    cfg = config(tmp_path, data, "many", on_nonfinite="skip", max_skipped_steps=1)
    with pytest.raises(AlignkitError) as err:
        loop.train(cfg, tiny_llama(), TOKENIZER)
    assert str(err.value).startswith("step 3: loss is nan; 2 steps skipped") and "max_skipped_steps (1)" in str(err.value)


def test_sft_weight_adds_the_chosen_responses_nll(task, one_thread):
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_records(6, seed=3)]
    examples = prepare_examples(records, task.tokenizer, ExampleSettings("pairs", 64))
    pad = task.tokenizer.pad_token_id
    ref = Reference(*reference_logps(task.model, examples, Packing(1024, 512, pad), use_cache=False))
    batch = pack(examples, list(range(len(examples))), 512, pad)
    spec = get_loss("dpo")
    opts = build_options(spec, {"beta": 0.1})
    with torch.no_grad():
        plain, _ = Method(spec, opts).forward(task.model, batch, examples, ref)
        weighted, metrics = Method(spec, opts, sft_weight=0.5).forward(task.model, batch, examples, ref)
    chosen_lengths = torch.tensor([len(e.response_ids[0]) for e in examples], dtype=torch.float32)
    nll = -metrics["logps/chosen"] / chosen_lengths  # the chosen response's per-token NLL
    torch.testing.assert_close(metrics["nll"], nll)
    torch.testing.assert_close(weighted, plain + 0.5 * nll)


def test_a_bf16_autocast_training_step(task, one_thread):
    """precision bf16: the forward runs in bf16 (the loss differs from fp32's, a little), the weights stay fp32 and
    the optimizer step updates them."""
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_records(6, seed=4)]
    examples = prepare_examples(records, task.tokenizer, ExampleSettings("pairs", 64))
    pad = task.tokenizer.pad_token_id
    model = copy.deepcopy(task.model)
    ref = Reference(*reference_logps(model, examples, Packing(1024, 512, pad), use_cache=False))
    batch = pack(examples, list(range(len(examples))), 512, pad)
    spec, opts = get_loss("dpo"), build_options(get_loss("dpo"), {"beta": 0.1})
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # policy != reference: a non-trivial loss
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(model="tiny", train_data="x.jsonl", precision=precision)
        with autocast(cfg, model):
            losses, _ = Method(spec, opts).forward(model, batch, examples, ref)
        results[precision] = losses
    assert results["bf16"].dtype == torch.float32  # losses come back in fp32
    assert not torch.equal(results["bf16"], results["fp32"])  # bf16 matmuls ran
    torch.testing.assert_close(results["bf16"], results["fp32"], atol=5e-2, rtol=5e-2)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    results["bf16"].mean().backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight.detach(), before)
