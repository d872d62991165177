"""The prefix-shared packer and the chunked log-probs: packed rows give the same log-probs as running every
[prompt, response] separately through the unmodified model (DESIGN.md), and the chunked vocabulary
projection gives the same values and gradients as a plain log_softmax."""

from __future__ import annotations

import random

import pytest
import torch

import alignkit.models.logprobs as logprobs_module
from alignkit.data.pack import block_mask, pack, token_budget_batches
from alignkit.data.tokenize import TokenizedExample
from alignkit.models.attention import loadable_attention, set_attention
from alignkit.models.logprobs import PackedForward, chunked_token_logps, response_logprobs
from alignkit.models.tiny import build_tiny_model

VOCAB = 61
PAD_ID = 0
FAMILIES = ["llama", "qwen2", "gpt2"]
ATTENTION = ["packed_sdpa", "sdpa", "eager"]


def random_examples(n: int, k: int, seed: int, max_prompt: int = 7, max_response: int = 6) -> list[TokenizedExample]:
    """Examples with prompts of 1..max_prompt tokens and k responses of uneven lengths (never the pad id)."""
    rng = random.Random(seed)

    def ids(length: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(length)]

    examples = []
    for _ in range(n):
        lengths = [rng.randint(1, max_response) for _ in range(k)]
        if len(set(lengths)) == 1:  # make sure siblings differ in length
            lengths[0] = lengths[0] % max_response + 1
        examples.append(TokenizedExample(ids(rng.randint(1, max_prompt)), [ids(n) for n in lengths]))
    return examples


def separate_token_logps(model, example: TokenizedExample) -> list[torch.Tensor]:
    """Per-token log-probs of each response, from its own unpacked [prompt, response] forward pass."""
    prompt_len = len(example.prompt_ids)
    result = []
    for response in example.response_ids:
        input_ids = torch.tensor([example.prompt_ids + response])
        logits = model(input_ids=input_ids).logits[0]
        logps = torch.log_softmax(logits.float(), dim=-1)[prompt_len - 1:prompt_len - 1 + len(response)]
        result.append(logps.gather(1, torch.tensor(response)[:, None]).squeeze(1))
    return result


@pytest.fixture(scope="module")
def tiny_models():
    cache = {}

    def get(family: str, attn: str):
        if (family, attn) not in cache:
            cache[family, attn] = build_tiny_model(family, VOCAB, seed=1, attn_implementation=loadable_attention(attn),
                                                   hidden=32, layers=2, heads=4).eval()
            set_attention(cache[family, attn], attn)
        return cache[family, attn]

    return get


# ---- packed log-probs == separate runs ----


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [2, 3])
def test_packed_logps_equal_separate_runs(tiny_models, family, attn, k):
    model = tiny_models(family, attn)
    examples = random_examples(7, k, seed=10 * k)
    # ~3 examples per row, several rows, the last rows shorter (padding at their end)
    row_budget = 3 * max(e.num_tokens for e in examples)
    batch = pack(examples, list(range(len(examples))), max_tokens_per_row=row_budget, pad_token_id=PAD_ID)
    assert batch.input_ids.shape[0] >= 2
    assert any(len({int(e) for e in row if e >= 0}) >= 2 for row in batch.example_ids)

    with torch.no_grad():
        out = response_logprobs(model, batch, chunk_size=5)
        expected = [separate_token_logps(model, e) for e in examples]

    expected_seq = torch.tensor([[float(t.sum()) for t in per_example] for per_example in expected])
    torch.testing.assert_close(out.seq_logps, expected_seq, rtol=0, atol=1e-5)
    lengths = torch.tensor([[len(r) for r in e.response_ids] for e in examples], dtype=torch.float32)
    torch.testing.assert_close(out.lengths, lengths)

    padded, mask = out.padded(batch)
    assert padded.shape == (len(examples), k, int(lengths.max()))
    for b, per_example in enumerate(expected):
        for i, token_logps in enumerate(per_example):
            n = len(token_logps)
            assert mask[b, i, :n].all() and not mask[b, i, n:].any()
            torch.testing.assert_close(padded[b, i, :n], token_logps, rtol=0, atol=1e-5)
            assert (padded[b, i, n:] == 0).all()


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_gradient_equals_separate_runs(tiny_models, family, attn):
    """The chunked head's custom backward, through the packed decoder, gives the separate runs' gradient."""
    model = tiny_models(family, attn)
    examples = random_examples(4, 2, seed=3)
    batch = pack(examples, max_tokens_per_row=2 * max(e.num_tokens for e in examples), pad_token_id=PAD_ID)
    weights = torch.linspace(0.5, 1.5, 2 * len(examples)).view(len(examples), 2)

    model.zero_grad()
    (response_logprobs(model, batch, chunk_size=3).seq_logps * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum((weights[b, i] * t.sum() for b, e in enumerate(examples)
                 for i, t in enumerate(separate_token_logps(model, e))), torch.tensor(0.0))
    total.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    model.zero_grad()


def test_single_example_longer_than_the_row_gets_its_own_row(tiny_models):
    model = tiny_models("llama", "sdpa")
    examples = random_examples(3, 2, seed=5)
    batch = pack(examples, max_tokens_per_row=2, pad_token_id=PAD_ID)  # every example exceeds the row budget
    assert batch.input_ids.shape[0] == 3
    with torch.no_grad():
        out = response_logprobs(model, batch)
        expected = torch.tensor([[float(t.sum()) for t in separate_token_logps(model, e)] for e in examples])
    torch.testing.assert_close(out.seq_logps, expected, rtol=0, atol=1e-5)


# ---- packer structure ----


def test_row_layout_positions_and_padding():
    examples = random_examples(9, 3, seed=7)
    max_row = 2 * max(e.num_tokens for e in examples)
    batch = pack(examples, list(range(100, 109)), max_tokens_per_row=max_row, pad_token_id=PAD_ID)
    assert batch.example_indices == list(range(100, 109))
    assert batch.num_examples == 9 and batch.num_responses == 3
    real = batch.example_ids >= 0
    assert batch.num_tokens == sum(e.num_tokens for e in examples)
    for r in range(batch.input_ids.shape[0]):
        n_real = int(real[r].sum())
        assert n_real <= max_row
        # padding only at the end of a row: the real tokens are a prefix
        assert real[r, :n_real].all() and not real[r, n_real:].any()
        assert (batch.input_ids[r, n_real:] == PAD_ID).all()
        assert (batch.segment_ids[r, n_real:] == -1).all()

    # Rebuild every example from its row and check positions restart at |P| for each response.
    seen = set()
    for r in range(batch.input_ids.shape[0]):
        for b in batch.example_ids[r].unique().tolist():
            if b < 0:
                continue
            seen.add(b)
            example = examples[b]
            cols = (batch.example_ids[r] == b).nonzero().squeeze(1)
            assert (cols.diff() == 1).all(), "an example occupies one contiguous span"
            segs = batch.segment_ids[r, cols]
            P = len(example.prompt_ids)
            prompt_cols = cols[segs == 0]
            assert batch.input_ids[r, prompt_cols].tolist() == example.prompt_ids
            assert batch.position_ids[r, prompt_cols].tolist() == list(range(P))
            for i, response in enumerate(example.response_ids):
                resp_cols = cols[segs == i + 1]
                assert batch.input_ids[r, resp_cols].tolist() == response
                assert batch.position_ids[r, resp_cols].tolist() == list(range(P, P + len(response)))
    assert seen == set(range(9))


def test_response_token_index_predicts_from_the_previous_token():
    examples = random_examples(4, 2, seed=8)
    batch = pack(examples, max_tokens_per_row=1000, pad_token_id=PAD_ID)
    assert len(batch.token_targets) == sum(sum(len(r) for r in e.response_ids) for e in examples)
    seq_start = {}
    for n, seq in enumerate(batch.token_seq.tolist()):
        seq_start.setdefault(seq, n)
        b, i = divmod(seq, 2)
        j = n - seq_start[seq]  # the token's offset in its response
        prompt, response = examples[b].prompt_ids, examples[b].response_ids[i]
        row, pred = int(batch.token_rows[n]), int(batch.token_pred_positions[n])
        assert int(batch.token_targets[n]) == response[j]
        # predicted by the prompt's last token (j = 0) or by the same response's previous token
        assert int(batch.input_ids[row, pred]) == (prompt[-1] if j == 0 else response[j - 1])
        assert int(batch.segment_ids[row, pred]) == (0 if j == 0 else i + 1)
        assert int(batch.example_ids[row, pred]) == b
        assert int(batch.position_ids[row, pred]) == len(prompt) - 1 + j
    lengths = torch.tensor([[len(r) for r in e.response_ids] for e in examples], dtype=torch.float32)
    torch.testing.assert_close(batch.seq_lengths, lengths)


def test_block_mask_matches_the_attention_rule():
    examples = random_examples(5, 3, seed=9)
    batch = pack(examples, max_tokens_per_row=3 * max(e.num_tokens for e in examples), pad_token_id=PAD_ID)
    allowed = block_mask(batch.example_ids, batch.segment_ids)
    R, T = batch.example_ids.shape
    for r in range(R):
        ex, seg = batch.example_ids[r].tolist(), batch.segment_ids[r].tolist()
        for q in range(T):
            for key in range(T):
                if ex[q] < 0:  # padding attends to earlier padding only
                    expected = ex[key] < 0 and key <= q
                else:
                    expected = key <= q and ex[key] == ex[q] and seg[key] in (0, seg[q])
                assert bool(allowed[r, q, key]) == expected, (r, q, key)
    # siblings and other examples are never visible; every query sees at least itself
    assert allowed.diagonal(dim1=1, dim2=2).all()
    additive = batch.attention_mask(torch.float32)
    assert additive.shape == (R, 1, T, T) and additive.dtype == torch.float32
    assert (additive[:, 0][allowed] == 0).all()
    assert (additive[:, 0][~allowed] == torch.finfo(torch.float32).min).all()


def test_pack_rejects_mixed_response_counts():
    examples = random_examples(2, 2, seed=1) + random_examples(1, 3, seed=2)
    with pytest.raises(ValueError, match="same number of responses"):
        pack(examples)


# ---- token-budget batches ----


def test_token_budget_batches_reproducible_and_within_budget():
    examples = random_examples(150, 2, seed=11, max_prompt=12, max_response=10)
    budget = 80
    first = token_budget_batches(examples, budget, seed=3, epoch=1)
    assert first == token_budget_batches(examples, budget, seed=3, epoch=1)
    assert first != token_budget_batches(examples, budget, seed=4, epoch=1)
    assert first != token_budget_batches(examples, budget, seed=3, epoch=2)
    assert sorted(i for batch in first for i in batch) == list(range(150))
    for batch in first:
        assert sum(examples[i].num_tokens for i in batch) <= budget
    # unshuffled batches keep the dataset order within each window
    plain = token_budget_batches(examples, budget, seed=0, shuffle=False, window=len(examples))
    assert sorted(i for batch in plain for i in batch) == list(range(150))


def test_token_budget_example_over_budget_gets_its_own_batch():
    examples = random_examples(20, 2, seed=12)
    big = TokenizedExample([1] * 30, [[2] * 20, [3] * 10])
    examples.append(big)
    batches = token_budget_batches(examples, 40, seed=0)
    assert [20] in batches
    for batch in batches:
        assert len(batch) == 1 or sum(examples[i].num_tokens for i in batch) <= 40


# ---- chunked log-probs ----


def naive_token_logps(hidden, weight, bias, targets):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("keep_bytes", [0, 2**20], ids=["recompute", "keep-probs"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 64])
def test_chunked_logps_values_and_gradients(chunk_size, with_bias, keep_bytes, monkeypatch):
    N, H, V = 23, 16, 37  # chunk sizes 4 and 7 do not divide N; 64 > N is a single chunk
    gen = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    bias = torch.randn(V, generator=gen) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)  # a non-uniform dL/dlogp exercises the per-token scaling

    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    chunked = chunked_token_logps(leaves[0], leaves[1], leaves[2] if with_bias else None, targets, chunk_size,
                                  keep_bytes=keep_bytes)
    projections = []
    original = logprobs_module._chunk_logits
    monkeypatch.setattr(logprobs_module, "_chunk_logits", lambda *a: projections.append(1) or original(*a))
    (chunked * upstream).sum().backward()
    # kept probabilities: the backward never recomputes the vocabulary projection; otherwise once per chunk
    assert len(projections) == (0 if keep_bytes else -(-N // chunk_size))

    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    naive = naive_token_logps(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None, targets)
    (naive * upstream).sum().backward()

    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-5)
    for ours, ref, name in zip(leaves, ref_leaves, ["hidden", "weight", "bias"]):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-5, msg=name)


def test_chunked_logps_only_hidden_needs_grad():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 8, generator=gen, requires_grad=True)
    weight, bias = torch.randn(11, 8, generator=gen), torch.randn(11, generator=gen)
    targets = torch.randint(0, 11, (9,), generator=gen)
    chunked_token_logps(hidden, weight, bias, targets, 4).sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    naive_token_logps(ref_hidden, weight, bias, targets).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=0, atol=1e-5)
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("keep_bytes", [0, 2**20], ids=["recompute", "keep-probs"])
def test_tempered_chunked_logps_are_log_softmax_of_logits_over_t(keep_bytes):
    """At temperature T the values and gradients are those of log_softmax(logits / T) (TRL's form); at T = 1 the
    division is skipped, so the numbers are bit for bit those of before; T <= 0 is refused."""
    N, H, V, T = 19, 16, 37, 0.7
    gen = torch.Generator().manual_seed(3)
    hidden, weight, bias = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen), torch.randn(V, generator=gen)
    targets, upstream = torch.randint(0, V, (N,), generator=gen), torch.randn(N, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    settings = logprobs_module.ChunkSettings(5, torch.float32, keep_bytes, temperature=T)
    tempered = logprobs_module.ChunkedTokenLogps.apply(*leaves, targets, settings)
    (tempered * upstream).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
    naive = torch.log_softmax(logits / T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (naive * upstream).sum().backward()
    torch.testing.assert_close(tempered, naive, rtol=0, atol=1e-5)
    for ours, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-5)
    assert not torch.allclose(tempered, naive_token_logps(hidden, weight, bias, targets), atol=1e-3)
    untempered = logprobs_module.ChunkSettings(5, torch.float32, keep_bytes, temperature=1.0)
    assert torch.equal(logprobs_module.ChunkedTokenLogps.apply(hidden, weight, bias, targets, untempered),
                       chunked_token_logps(hidden, weight, bias, targets, 5, keep_bytes))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_module.ChunkSettings(5, torch.float32, temperature=0.0)


def test_response_last_tokens_are_each_responses_final_position():
    examples = random_examples(6, 3, seed=4)
    batch = pack(examples, max_tokens_per_row=2 * max(e.num_tokens for e in examples), pad_token_id=PAD_ID)
    assert batch.input_ids.shape[0] >= 2
    rows, cols = batch.response_last_tokens()
    assert rows.shape == cols.shape == (6 * 3,)
    for b, example in enumerate(examples):
        for i, response in enumerate(example.response_ids):
            row, col = int(rows[b * 3 + i]), int(cols[b * 3 + i])
            span = (batch.example_ids[row] == b) & (batch.segment_ids[row] == i + 1)
            assert span[col] and not span[col + 1:].any() and int(span.sum()) == len(response)
            assert int(batch.input_ids[row, col]) == response[-1]


def test_packed_forward_module_returns_response_logprobs(tiny_models):
    model = tiny_models("llama", "packed_sdpa")
    examples = random_examples(4, 2, seed=8)
    batch = pack(examples, max_tokens_per_row=2 * max(e.num_tokens for e in examples), pad_token_id=PAD_ID)
    with torch.no_grad():
        token_logps, seq_logps, lengths, values, divergence = PackedForward(model)(batch, chunk_size=4)
        expected = response_logprobs(model, batch, chunk_size=4)
    torch.testing.assert_close(token_logps, expected.token_logps, rtol=0, atol=0)
    torch.testing.assert_close(seq_logps, expected.seq_logps, rtol=0, atol=0)
    torch.testing.assert_close(lengths, expected.lengths, rtol=0, atol=0)
    assert values is None and divergence is None and seq_logps.data_ptr() != expected.seq_logps.data_ptr()


def test_a_divergence_fn_sees_the_response_tokens_hidden_states_and_head_inside_the_module(tiny_models):
    """What distillation hands the wrapped module (train/teacher.py): a function of each response token's last
    hidden state and the head, taken in the module's forward so DDP / FSDP2 reduce its gradient with the rest."""
    model = tiny_models("llama", "packed_sdpa")
    examples = random_examples(4, 2, seed=8)
    batch = pack(examples, max_tokens_per_row=2 * max(e.num_tokens for e in examples), pad_token_id=PAD_ID)

    def logsumexp(hidden, head):
        return torch.logsumexp(hidden @ head.weight.T, dim=-1)

    out = response_logprobs(PackedForward(model), batch, chunk_size=4, divergence_fn=logsumexp)
    with torch.no_grad():  # each response run alone, its logits at the positions that predict its tokens
        per_seq = {b * 2 + j: model(torch.tensor([e.prompt_ids + r])).logits[0, len(e.prompt_ids) - 1:-1]
                   for b, e in enumerate(examples) for j, r in enumerate(e.response_ids)}
    expected = torch.cat([per_seq[s] for s in torch.unique_consecutive(batch.token_seq).tolist()])
    torch.testing.assert_close(out.divergence.detach(), torch.logsumexp(expected, -1), rtol=0, atol=1e-4)
    assert len(out.divergence) == len(out.token_logps)
    out.divergence.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- the packer's boundaries and defaults ----


def fixed(prompt: int, *responses: int) -> TokenizedExample:
    return TokenizedExample([7] * prompt, [[8] * n for n in responses])


def test_rows_fill_exactly_to_the_budget_and_default_to_4096_tokens_and_pad_zero():
    exact = [fixed(3, 2, 1), fixed(2, 1, 1)]  # 6 + 4 tokens: exactly a 10-token row
    batch = pack(exact, max_tokens_per_row=10, pad_token_id=5)
    assert batch.input_ids.shape == (1, 10)
    assert pack(exact, max_tokens_per_row=9).input_ids.shape == (2, 6)  # one token over: a second row
    assert pack(exact * 3, max_tokens_per_row=10).input_ids.shape == (3, 10)  # every new row fills to the budget too
    big = [fixed(2000, 48, 1), fixed(2000, 46, 1)]  # 2049 + 2047 = 4096 tokens
    assert pack(big).input_ids.shape == (1, 4096)
    assert pack(big + [fixed(1, 1, 1)]).input_ids.shape[0] == 2
    assert pack([fixed(2000, 48, 1), fixed(2000, 47, 1)]).input_ids.shape[0] == 2  # 4097 tokens: over
    padded = pack([fixed(3, 2, 1), fixed(1, 1, 1)], max_tokens_per_row=6)  # rows of 6 and 3 tokens
    tail = padded.example_ids[1] < 0
    assert tail.sum() == 3 and (padded.input_ids[1][tail] == 0).all()  # the default pad id is 0
    assert (padded.example_ids[1][tail] == -1).all() and (padded.segment_ids[1][tail] == -1).all()
    assert padded.input_ids.dtype == padded.example_ids.dtype == padded.token_targets.dtype == torch.long


def test_additive_mask_keeps_the_requested_dtype():
    from alignkit.data.pack import additive_mask

    allowed = torch.tensor([[[True, False], [True, True]]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mask = additive_mask(allowed, dtype)
        assert mask.dtype == dtype and mask.shape == (1, 1, 2, 2)
        assert mask[0, 0, 0, 1] == torch.finfo(dtype).min and mask[0, 0, 1].eq(0).all()


def test_token_budget_batches_fill_to_the_budget_share_batches_and_sort_by_length_in_windows():
    examples = [fixed(1, n) for n in (5, 1, 3, 2, 4, 2, 1, 3)]  # 2..6 tokens each
    batches = token_budget_batches(examples, max_tokens_per_batch=8, seed=0, shuffle=False, window=4)
    lengths = [[examples[i].num_tokens for i in b] for b in batches]
    assert all(sum(b) <= 8 for b in lengths) and any(len(b) > 1 for b in lengths)
    # within each window of 4 (in data order) the examples come shortest first
    flat = [i for b in batches for i in b]
    for start in (0, 4):
        window = flat[start:start + 4]
        assert sorted(window) == list(range(start, start + 4))
        assert [examples[i].num_tokens for i in window] == sorted(examples[i].num_tokens for i in window)
    exact = [fixed(1, 3), fixed(1, 3)]  # 4 + 4 tokens: one batch of exactly 8
    assert token_budget_batches(exact, 8, seed=0, shuffle=False) == [[0, 1]]
    assert token_budget_batches(exact, 7, seed=0, shuffle=False) == [[0], [1]]
    assert token_budget_batches(exact * 3, 8, seed=0, shuffle=False) == [[0, 1], [2, 3], [4, 5]]
    # the default epoch is 0: a plan asked for no epoch is the first epoch's
    assert token_budget_batches(examples, 8, seed=3) == token_budget_batches(examples, 8, seed=3, epoch=0)


def test_mismatched_completions_carry_the_loss_masks_of_chats():
    from alignkit.data.pack import with_mismatched_completions

    chat = TokenizedExample([1, 2], [[3, 4, 5]], response_loss_masks=[[True, False, True]])
    plain = TokenizedExample([6], [[7, 8]])
    other_chat = TokenizedExample([9], [[10, 11]], response_loss_masks=[[False, True]])
    a, b = with_mismatched_completions([chat, plain])
    assert a.response_ids == [[3, 4, 5], [7, 8]] and a.response_loss_masks == [[True, False, True], [True, True]]
    assert b.response_ids == [[7, 8], [3, 4, 5]] and b.response_loss_masks == [[True, True], [True, False, True]]
    c, d = with_mismatched_completions([plain, other_chat], max_length=2)  # room after [6]: one token
    assert c.response_ids == [[7, 8], [10]] and c.response_loss_masks == [[True, True], [False]]
    assert d.response_loss_masks == [[False, True], [True]]
    e, f = with_mismatched_completions([plain, TokenizedExample([6], [[9]])])
    assert e.response_loss_masks is None and f.response_loss_masks is None
