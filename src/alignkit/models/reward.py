"""Sequence reward models: one scalar per response of a PackedBatch, from an HF sequence-classification model.

Decoder backbones (Llama, Qwen2, GPT-2, ...: `*ForSequenceClassification` with a per-token linear head `score`)
run once over the packed rows; the reward of a response is `score` applied to the hidden state of its last token.
HF's own forward reads the last non-pad token of a padded row instead, which packing does not have; on an unpadded
[prompt, response] the two are the same number. Encoder backbones (BERT-like: a pooler + `classifier`) attend both
ways, so each [CLS] prompt [SEP] response [SEP] runs unpacked through the model's own forward.
"""

from __future__ import annotations

import torch

from alignkit.data.pack import PackedBatch
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import AlignkitError
from alignkit.models.logprobs import packed_hidden_states


def load_reward_model(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """(model, tokenizer): AutoModelForSequenceClassification with one label. From a causal LM checkpoint the
    score head is new (initialised by HF); from a saved reward model it is the trained one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.models.resolve import resolve_model

    model_dir = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AlignkitError(f"model '{name_or_path}': the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # only fills unpacked encoder batches, where it is masked
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}  # None: HF's default
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_decoder_reward_model(model) -> bool:
    """True for heads that score every token (`score`: decoder RMs), False for pooled encoder heads."""
    return isinstance(getattr(_base(model), "score", None), torch.nn.Linear)


def sequence_rewards(model, batch: PackedBatch) -> torch.Tensor:
    """[B, k] reward of every response of the batch."""
    if not is_decoder_reward_model(model):
        return encoder_rewards(model, batch)
    hidden = packed_hidden_states(model, batch)
    rows, cols = batch.response_last_tokens()
    last_hidden = hidden[rows.to(hidden.device), cols.to(hidden.device)]
    rewards = _base(model).score(last_hidden)[:, 0]
    return rewards.view(batch.num_examples, batch.num_responses)


def encoder_rewards(model, batch: PackedBatch) -> torch.Tensor:
    """[B, k]: every [prompt, response_i] of the batch cut out of the packed rows and run as one padded batch
    (token type 0 on the prompt, 1 on the response where the model has token types)."""
    sequences, token_types = [], []
    for b in range(batch.num_examples):
        row = int((batch.example_ids == b).any(dim=1).nonzero()[0])
        in_example = batch.example_ids[row] == b
        prompt = batch.input_ids[row][in_example & (batch.segment_ids[row] == 0)]
        for i in range(batch.num_responses):
            response = batch.input_ids[row][in_example & (batch.segment_ids[row] == i + 1)]
            sequences.append(torch.cat([prompt, response]))
            token_types.append(torch.cat([torch.zeros_like(prompt), torch.ones_like(response)]))
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id or 0
    input_ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
    kwargs = {}
    if getattr(model.config, "type_vocab_size", 1) > 1:
        kwargs["token_type_ids"] = torch.nn.utils.rnn.pad_sequence(token_types, batch_first=True).to(device)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs).logits
    return logits[:, 0].view(batch.num_examples, batch.num_responses)


def add_pair_special_tokens(example: TokenizedExample, tokenizer, max_length: int) -> TokenizedExample:
    """An encoder's pair layout, [CLS] prompt [SEP] + response [SEP], from an example tokenised without special
    tokens; responses are cut so prompt + response stays within max_length."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise AlignkitError("an encoder reward model needs a tokenizer with cls and sep tokens")
    prompt = [cls_id, *example.prompt_ids, sep_id]
    room = max(1, max_length - len(prompt) - 1)
    responses = [response[:room] + [sep_id] for response in example.response_ids]
    return TokenizedExample(prompt, responses, example.source, example.row, dict(example.extras))


def prepare_reward_examples(model, tokenizer, examples: list[TokenizedExample], max_length: int):
    """Examples as the reward model reads them: unchanged for decoders, in the pair layout for encoders."""
    if is_decoder_reward_model(model):
        return examples
    return [add_pair_special_tokens(e, tokenizer, max_length) for e in examples]
