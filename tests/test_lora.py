"""LoRA (peft): training moves only the adapters; the reference is the base model computed by disabling them
(no second copy); the final save is a merged HF model (or the adapter) that reloads with equal log-probs; an
interrupted LoRA run resumes exactly from adapter-only checkpoints."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.pack import pack
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.models.logprobs import response_logprobs
from alignkit.models.lora import adapters_disabled, is_peft
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train import loop, reference
from alignkit.train.logging import read_metrics
from alignkit.train.method import Method
from alignkit.train.packing import Packing

TOKENIZER = build_word_tokenizer(VOCABULARY)
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def tiny_llama():
    return build_tiny_model("llama", len(TOKENIZER), seed=0, hidden=32, layers=2, heads=4)


def config(tmp_path, name: str, **values) -> TrainConfig:
    settings = dict(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / name),
                    loss="dpo", learning_rate=2e-2, ref_cache=False, max_length=64, max_tokens_per_row=512,
                    max_tokens_per_batch=160, max_steps=3, progress=False, lora=LORA)
    return TrainConfig(**{**settings, **values})


@pytest.fixture
def data(tmp_path):
    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(24, seed=5))
    examples = prepare_examples(str(tmp_path / "pairs.jsonl"), TOKENIZER, ExampleSettings("pairs", 64))
    return examples, pack(examples[:12], list(range(12)), max_tokens_per_row=512)


@torch.no_grad()
def seq_logps(model, batch):
    was_training = model.training
    model.eval()
    out = response_logprobs(model, batch).seq_logps
    model.train(was_training)
    return out


def losses(output_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir)]


def base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_lora_trains_adapters_only_and_the_reference_is_the_base(tmp_path, data):
    examples, batch = data
    base = tiny_llama()
    result = loop.train(config(tmp_path, "adapter", lora={**LORA, "save": "adapter"}), tiny_llama(), TOKENIZER)
    policy = result.model
    assert is_peft(policy)

    initial = base.state_dict()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, tensor in policy.named_parameters():
        if "lora_" in name:
            continue
        torch.testing.assert_close(tensor, initial[base_name(name)], rtol=0, atol=0, msg=name)  # frozen
    moved = [n for n, p in policy.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert len(moved) == 2 * len(LORA["target_modules"])  # every adapter's B left zero

    base_logps, policy_logps = seq_logps(base, batch), seq_logps(policy, batch)
    assert (policy_logps - base_logps).abs().max() > 1e-3  # training changed the policy ...
    with adapters_disabled(policy):  # ... but with the adapters off it is the base model again (to fp32 rounding)
        torch.testing.assert_close(seq_logps(policy, batch), base_logps, rtol=1e-6, atol=1e-6)
    # the loop's reference helper disables them itself: the reference equals scoring the base model
    args = (Packing(160, 512, 0),)
    ref_seq, ref_tokens = reference.reference_logps(policy, examples, *args, use_cache=False)
    base_seq, base_tokens = reference.score_examples(base, examples, *args)
    torch.testing.assert_close(ref_seq, base_seq, rtol=1e-6, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(ref_tokens, base_tokens))

    # save: adapter -> peft's adapter directory; it reloads onto the base with the same log-probs
    final = tmp_path / "adapter" / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_llama(), final)
    torch.testing.assert_close(seq_logps(reloaded, batch), policy_logps, rtol=1e-6, atol=1e-6)

    # save: merged (the default) -> an ordinary HF directory with the adapters folded in
    merged = loop.train(config(tmp_path, "merged"), tiny_llama(), TOKENIZER)
    assert not is_peft(merged.model)
    assert losses(tmp_path / "merged") == losses(tmp_path / "adapter")  # the same training; only the save differs
    merged_dir = tmp_path / "merged" / "final"
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(seq_logps(plain, batch), policy_logps, rtol=0, atol=1e-5)  # merge rounding only


def test_lora_resumes_exactly_from_adapter_checkpoints(tmp_path, data, monkeypatch):
    straight = loop.train(config(tmp_path, "straight", max_steps=4, max_tokens_per_batch=80), tiny_llama(), TOKENIZER)

    real, calls = Method.forward, {"n": 0}

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    settings = dict(max_steps=4, max_tokens_per_batch=80, save_every=1)
    monkeypatch.setattr(Method, "forward", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config(tmp_path, "resumed", **settings), tiny_llama(), TOKENIZER)
    monkeypatch.setattr(Method, "forward", real)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-00000002"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()

    resumed = loop.train(config(tmp_path, "resumed", **settings), tiny_llama(), TOKENIZER)
    drop = ("tokens_per_s",)
    rows = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "resumed")]
    assert rows == [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "straight")]
    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
