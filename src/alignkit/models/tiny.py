"""Tiny models and a word-level tokenizer built in-process: what tests and the quickstart run on (no hub)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word tokenizer over a fixed vocabulary. It has no chat template on purpose:
    chat data then goes through alignkit's built-in default template."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *words]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = None
    return tokenizer


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 512):
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    if family == "bert":  # an encoder, for reward models only
        return BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_positions, pad_token_id=0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
        )
    raise ValueError(f"unknown tiny model family '{family}' (llama, qwen2, gpt2, bert)")


def build_tiny_model(family: str, vocab_size: int, seed: int = 0, attn_implementation: str = "sdpa", **sizes):
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size, **sizes)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model


def build_tiny_reward_model(family: str, vocab_size: int, seed: int = 0, attn_implementation: str = "sdpa", **sizes):
    """A tiny AutoModelForSequenceClassification with one label (a reward model) on a decoder or BERT backbone."""
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size, **sizes)
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation,
                                                          dtype=torch.float32)


def build_tiny_prm(family: str, vocab_size: int, seed: int = 0, attn_implementation: str = "sdpa", **sizes):
    """A tiny AutoModelForTokenClassification with two labels (bad, good): a process reward model."""
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size, **sizes)
    config.num_labels = 2
    config.classifier_dropout = 0.0  # tiny models train for a few hundred steps: no dropout on the head
    return AutoModelForTokenClassification.from_config(config, attn_implementation=attn_implementation,
                                                       dtype=torch.float32)
