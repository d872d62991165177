"""Token-exact rollouts: the hf engine returns the sampled ids, each token's log-prob under the distribution it was
sampled from (equal to the trainer's log-softmax on those tokens), and why each sample ended; every online method
trains exactly those ids; a perturbed engine shows its gap to the trainer, and truncated importance sampling (TIS)
weights the GRPO surrogate by min(pi_trainer / pi_engine, C) as NumPy computes it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignkit.config import SamplingOptions
from alignkit.errors import ConfigError
from alignkit.generate.engines import HFEngine, as_engine, encode_prompts
from alignkit.losses import LossInputs
from alignkit.losses.online import GRPOOptions, grpo_loss
from alignkit.online import OnlineInputs, online_config, run_online, sampling
from alignkit.online import run as online_run
from alignkit.online.rollout import RolloutShape, generate_rollout
from alignkit.online.run import check_online_setup
from alignkit.train.method import Method
from alignkit.train.packing import Packing
from alignkit.train.reference import score_examples
from synthetic_task import SENTIMENT, prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models run on one thread (tests/conftest.py)


def test_hf_engine_ids_logprobs_and_finish_reasons(task):
    questions = prompts(8, seed=4)
    for max_new_tokens in (5, 12):
        cfg = SamplingOptions(max_new_tokens=max_new_tokens, engine="hf")
        rollout = generate_rollout(task.model, task.tokenizer, questions, SENTIMENT, cfg, RolloutShape(3, 64, seed=3))
        generation = HFEngine(task.model, task.tokenizer).generate(encode_prompts(task.tokenizer, questions), cfg, 3, 3)
        eos = task.tokenizer.eos_token_id
        for example, ids, reasons, done in zip(rollout.examples, generation.ids, generation.finish_reasons,
                                              rollout.finished.tolist()):
            assert example.response_ids == ids  # the trained ids are the sampled ids
            assert [r == "stop" for r in reasons] == done == [s[-1] == eos for s in ids]  # EOS iff the sampler emitted it
            assert all(len(s) == max_new_tokens for s, r in zip(ids, reasons) if r == "length")
        # the engine's log-probs are the trainer's log-softmax on the same tokens (fp32)
        _, trainer = score_examples(task.model, rollout.examples, Packing(1024, 512, task.tokenizer.pad_token_id))
        for engine, ours in zip(rollout.engine_logps, trainer):
            torch.testing.assert_close(engine, ours, rtol=0, atol=1e-4)


def test_engine_logprobs_are_of_the_distribution_sampled_from(task):
    ids = encode_prompts(task.tokenizer, prompts(4, seed=5))
    engine = HFEngine(task.model, task.tokenizer)
    top1 = engine.generate(ids, SamplingOptions(max_new_tokens=6, temperature=0.7, top_k=1), 2, 1)
    assert all(lp == pytest.approx(0.0, abs=1e-6) for row in top1.logprobs for s in row for lp in s)  # p = 1
    greedy = engine.generate(ids, SamplingOptions(max_new_tokens=6, temperature=0), 1, 1)
    assert [row[0] for row in greedy.ids] == [s[0] for s in top1.ids]  # top-1 sampling is greedy decoding
    hot = engine.generate(ids, SamplingOptions(max_new_tokens=6, temperature=2.0), 2, 1)
    examples = generate_rollout(engine, task.tokenizer, prompts(4, seed=5), SENTIMENT,
                                SamplingOptions(max_new_tokens=6, temperature=2.0, engine="hf"),
                                RolloutShape(2, 64, seed=1)).examples
    _, trainer = score_examples(task.model, examples, Packing(1024, 512, task.tokenizer.pad_token_id))
    flat_hot = torch.tensor([lp for row in hot.logprobs for s in row for lp in s])
    assert not torch.allclose(flat_hot, torch.cat(trainer), atol=1e-3)  # tempered: not the policy's own log-probs


class Perturbed:
    """An engine whose log-probs are off by `shift` (what a real engine's kernels or precision can do)."""

    def __init__(self, engine, tokenizer, shift: float):
        self.inner, self.shift = as_engine(engine, tokenizer), shift

    def update_weights(self, model):
        self.inner.update_weights(model)

    def generate(self, prompt_ids, sampling, num_samples=1, seed=0):
        out = self.inner.generate(prompt_ids, sampling, num_samples, seed)
        out.logprobs = [[[lp + self.shift for lp in s] for s in row] for row in out.logprobs]
        return out


def one_round(task, tmp_path, method: str, engine_shift: float | None = None, **overrides):
    settings = dict(method=method, model="tiny", prompts="-", output_dir=str(tmp_path / method), rounds=1,
                    prompts_per_round=8, num_samples=4, max_new_tokens=10, max_length=64, max_tokens_per_row=512,
                    learning_rate=1e-3, eval_samples=1, progress=False)
    cfg = online_config({**settings, **overrides})
    seen, real_learn, real_rollout = {}, online_run.OnlineRun.learn, sampling.generate_rollout

    def learn(self, experience, *args):
        seen["experience"] = experience
        return real_learn(self, experience, *args)

    calls = [0]

    def rollout(generator, *args, **kwargs):  # call 1 is the starting evaluation, call 2 the round's rollout
        calls[0] += 1
        if engine_shift is not None and calls[0] == 2:
            generator = Perturbed(generator, task.tokenizer, engine_shift)
        result = real_rollout(generator, *args, **kwargs)
        if calls[0] == 2:
            seen["rollout"] = result
        return result

    online_run.OnlineRun.learn, sampling.generate_rollout = learn, rollout
    try:
        result = run_online(cfg, copy.deepcopy(task.model), task.tokenizer,
                            OnlineInputs(prompts(32, seed=9), prompts(4, seed=10), SENTIMENT))
    finally:
        online_run.OnlineRun.learn, sampling.generate_rollout = real_learn, real_rollout
    return result, seen


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo", "online-dpo"])
def test_every_online_method_trains_the_sampled_ids(task, tmp_path, method):
    result, seen = one_round(task, tmp_path, method)
    rollout, trained = seen["rollout"], seen["experience"].examples
    if method == "online-dpo":  # pairs of a prompt's own samples
        assert trained and all(any(t.prompt_ids == e.prompt_ids and all(r in e.response_ids for r in t.response_ids)
                                   for e in rollout.examples) for t in trained)
    else:
        assert [(t.prompt_ids, t.response_ids) for t in trained] == [(e.prompt_ids, e.response_ids)
                                                                      for e in rollout.examples]
    if method in ("grpo", "ppo"):  # the first step is on-policy: no ratio clipped, engine == trainer
        row = result.rounds[0]
        assert row["engine_gap_mean"] < 1e-4 and row["engine_gap_max"] < 1e-4
        if method == "grpo":
            assert row["clip_fraction"] == 0.0


def test_a_perturbed_engine_shows_its_gap(task, tmp_path):
    result, _ = one_round(task, tmp_path, "grpo", engine_shift=0.3)
    row = result.rounds[0]
    assert row["engine_gap_mean"] == pytest.approx(0.3, abs=1e-4) and row["engine_gap_max"] == pytest.approx(0.3,
                                                                                                            abs=1e-4)
    # TIS: every token's weight is min(pi_trainer / pi_engine, C) = exp(-0.3); on-policy the KL term has no
    # gradient yet, so the whole gradient scales by it
    corrected, _ = one_round(task, tmp_path / "tis", "grpo", engine_shift=0.3, tis_cap=2.0)
    assert corrected.rounds[0]["grad_norm"] == pytest.approx(np.exp(-0.3) * row["grad_norm"], rel=1e-4)
    capped, _ = one_round(task, tmp_path / "cap", "grpo", engine_shift=-0.3, tis_cap=1.2)  # exp(0.3) > 1.2
    assert capped.rounds[0]["grad_norm"] == pytest.approx(1.2 * row["grad_norm"], rel=1e-4)


def first_step_inputs(monkeypatch) -> list:
    """Records the LossInputs of every learner forward (the first is before any update)."""
    seen, real = [], Method._with_extras

    def record(self, inputs, losses, metrics):
        seen.append(inputs)
        return real(self, inputs, losses, metrics)

    monkeypatch.setattr(Method, "_with_extras", record)
    return seen


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_a_tempered_rollout_is_scored_at_its_temperature(task, tmp_path, monkeypatch, engine):
    """At T = 0.7 the learner, the behaviour scorer and the reference divide the logits by T: before any update the
    engine's log-probs equal the trainer's (fp32 engines), the ratio to the behaviour policy is exactly 1, and the
    KL to the reference (a copy of the policy) is exactly 0."""
    seen = first_step_inputs(monkeypatch)
    result, _ = one_round(task, tmp_path, "grpo", temperature=0.7, engine=engine, num_iterations=2)
    row = result.rounds[0]
    assert row["engine_gap_mean"] < 1e-4 and row["engine_gap_max"] < 1e-4
    first = seen[0]
    mask, logps = first.token_mask, first.token_logps.detach()
    assert torch.equal(torch.exp(logps - first.old_token_logps)[mask], torch.ones(int(mask.sum())))
    assert torch.equal(first.ref_token_logps[mask], logps[mask])


def test_top_k_top_p_leave_the_kept_mass_as_the_gap(task, tmp_path, monkeypatch):
    """With top-k / top-p the engine's log-probs are of the renormalised kept set; the trainer's are of the whole
    tempered distribution (as TRL's), so log pi_engine - log pi_trainer = -log(kept mass) >= 0 on every token."""
    seen = first_step_inputs(monkeypatch)
    result, _ = one_round(task, tmp_path, "grpo", temperature=0.7, top_k=8, top_p=0.9, engine="fast")
    first = seen[0]
    gap = (first.engine_token_logps - first.token_logps.detach())[first.token_mask]
    assert (gap > -1e-5).all() and result.rounds[0]["engine_gap_mean"] > 1e-3


def test_greedy_online_training_is_refused():
    cfg = online_config(dict(method="grpo", model="tiny", prompts="-", temperature=0.0))
    with pytest.raises(ConfigError, match="sampling.temperature"):
        check_online_setup(cfg, SimpleNamespace(enabled=False))


def test_tis_weights_match_numpy():
    rng = np.random.default_rng(0)
    B, k, T = 2, 3, 4
    logps = torch.tensor(rng.normal(-2, 0.5, (B, k, T)), dtype=torch.float64, requires_grad=True)
    engine = torch.tensor(rng.normal(-2, 0.5, (B, k, T)), dtype=torch.float64)
    mask = torch.tensor(rng.random((B, k, T)) > 0.2)
    mask[..., 0] = True
    scores = torch.tensor(rng.normal(0, 1, (B, k)), dtype=torch.float64)
    inputs = LossInputs(logps=(logps * mask).sum(-1), lengths=mask.sum(-1).double(), token_logps=logps * mask,
                        token_mask=mask, rewards=scores, engine_token_logps=engine)
    cap = 1.5
    losses, _ = grpo_loss(inputs, GRPOOptions(kl_coef=0.0, tis_cap=cap))
    # NumPy: ratio 1 on-policy, so the surrogate is -A per token, weighted by min(exp(l - l_engine), cap)
    lp, en, m = logps.detach().numpy(), engine.numpy(), mask.numpy()
    s = scores.numpy()
    adv = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-4)
    w = np.minimum(np.exp(np.where(m, lp - en, 0.0)), cap)
    per_token = -adv[..., None] * w * m
    expected = (per_token.sum(-1) / m.sum(-1)).mean(1)
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


# ---- the fast engine ----


def test_fast_engine_greedy_is_hf_greedy_and_its_logprobs_are_the_trainers(task):
    from alignkit.generate.engines import FastEngine

    ids = encode_prompts(task.tokenizer, prompts(12, seed=6))
    greedy = SamplingOptions(max_new_tokens=12, temperature=0, batch_size=5)
    for batch in (ids, [ids[0][:1], ids[1]]):  # also a one-token prompt (its prefill is a single query)
        assert FastEngine(task.model, task.tokenizer).generate(batch, greedy).ids == \
            HFEngine(task.model, task.tokenizer).generate(batch, greedy).ids
    # sampled: most samples end at the 8th token, so finished rows leave the batch mid-way; every row's log-probs
    # must still be the trainer's on that row's tokens
    cfg = SamplingOptions(max_new_tokens=12, batch_size=6, engine="fast")
    rollout = generate_rollout(task.model, task.tokenizer, prompts(12, seed=6), SENTIMENT, cfg,
                               RolloutShape(4, 64, seed=2))
    assert 0 < float(rollout.finished.float().mean()) < 1 or bool(rollout.finished.all())
    _, trainer = score_examples(task.model, rollout.examples, Packing(1024, 512, task.tokenizer.pad_token_id))
    for engine, ours in zip(rollout.engine_logps, trainer):
        torch.testing.assert_close(engine, ours, rtol=0, atol=1e-4)
    again = generate_rollout(task.model, task.tokenizer, prompts(12, seed=6), SENTIMENT, cfg,
                             RolloutShape(4, 64, seed=2))
    assert [e.response_ids for e in again.examples] == [e.response_ids for e in rollout.examples]  # seeded
    # bf16 weights: the stated bound on the log-prob gap to the fp32 trainer
    bf16 = generate_rollout(task.model, task.tokenizer, prompts(12, seed=6), SENTIMENT,
                            SamplingOptions(max_new_tokens=12, engine="fast", engine_precision="bf16"),
                            RolloutShape(4, 64, seed=2))
    _, trainer = score_examples(task.model, bf16.examples, Packing(1024, 512, task.tokenizer.pad_token_id))
    assert max(float((e - t).abs().max()) for e, t in zip(bf16.engine_logps, trainer)) < 0.1


def test_fast_engine_top_k_top_p_and_temperature(task):
    from alignkit.generate.engines import FastEngine

    engine = FastEngine(task.model, task.tokenizer)
    ids = encode_prompts(task.tokenizer, prompts(4, seed=5))
    top1 = engine.generate(ids, SamplingOptions(max_new_tokens=6, temperature=0.7, top_k=1), 2, 1)
    assert all(lp == pytest.approx(0.0, abs=1e-6) for row in top1.logprobs for s in row for lp in s)
    greedy = engine.generate(ids, SamplingOptions(max_new_tokens=6, temperature=0), 1)
    assert [row[0] for row in greedy.ids] == [row[0] for row in top1.ids]
    # top-p: every sampled token lies in the smallest set of mass >= p, and its log-prob is renormalised over it
    nucleus = engine.generate(ids, SamplingOptions(max_new_tokens=1, top_p=0.5), 8, 3)
    logits = task.model(torch.tensor([ids[0]])).logits[0, -1].double()
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    kept = order[:int((probs[order].cumsum(0) < 0.5).sum()) + 1]
    for token, lp in zip((s[0] for s in nucleus.ids[0]), (s[0] for s in nucleus.logprobs[0])):
        assert token in kept.tolist()
        assert lp == pytest.approx(float(probs[token].log() - probs[kept].sum().log()), abs=1e-4)


def test_fast_engine_weight_push_equals_reloading(task):
    from alignkit.generate.engines import FastEngine

    model = copy.deepcopy(task.model)
    engine = FastEngine(model, task.tokenizer)
    ids = encode_prompts(task.tokenizer, prompts(6, seed=7))
    cfg = SamplingOptions(max_new_tokens=10)
    before = engine.generate(ids, cfg, 3, 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    assert engine.generate(ids, cfg, 3, 4).ids == before.ids  # the engine holds its own copy until pushed
    engine.update_weights(model)
    pushed = engine.generate(ids, cfg, 3, 4)
    reloaded = FastEngine(copy.deepcopy(model), task.tokenizer).generate(ids, cfg, 3, 4)
    assert pushed.ids == reloaded.ids and pushed.logprobs == reloaded.logprobs and pushed.ids != before.ids


def test_fast_engine_keeps_one_copy_of_a_tied_embedding_and_head(task):
    """A tied model's embedding and head are one matrix: the engine copies it once (a SmolLM2-sized vocabulary copy
    saved), and samples as the untied copies did; an untied model keeps two."""
    from alignkit.generate.engines import FastEngine
    from alignkit.models.tiny import tiny_config

    tied_config = tiny_config("llama", task.model.config.vocab_size)
    tied_config.tie_word_embeddings = True
    tied = type(task.model)(tied_config).eval()
    assert tied.get_output_embeddings().weight is tied.model.embed_tokens.weight
    ids = encode_prompts(task.tokenizer, prompts(4, seed=8))
    cfg = SamplingOptions(max_new_tokens=8)
    for precision in (None, "bf16"):
        engine = FastEngine(tied, task.tokenizer, precision or "fp32")
        assert engine.head.data_ptr() == engine.embed.data_ptr()
        shared = engine.generate(ids, cfg, 2, 5)
        engine.head = engine.head.clone()  # what the engine held before: two equal copies
        separate = engine.generate(ids, cfg, 2, 5)
        assert shared.ids == separate.ids and shared.logprobs == separate.logprobs
    untied = FastEngine(task.model, task.tokenizer)
    assert untied.head.data_ptr() != untied.embed.data_ptr()
    torch.testing.assert_close(untied.head, task.model.get_output_embeddings().weight, rtol=0, atol=0)


def test_fast_engine_sleeps_through_the_learner_and_wakes_with_the_new_weights(task, tmp_path, monkeypatch):
    """sleep() drops the engine's weight copies (the learner's peak does not carry them), generate refuses to run
    asleep, and the next update_weights brings it back: an online round scores and learns with the engine asleep."""
    from alignkit.generate.engines import FastEngine

    model = copy.deepcopy(task.model)
    engine = FastEngine(model, task.tokenizer)
    ids = encode_prompts(task.tokenizer, prompts(4, seed=7))
    cfg = SamplingOptions(max_new_tokens=8)
    before = engine.generate(ids, cfg, 2, 4)
    engine.sleep()
    assert engine.layers is None and engine.head is None and engine.embed is None
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(ids, cfg, 2, 4)
    engine.update_weights(model)
    awake = engine.generate(ids, cfg, 2, 4)
    assert awake.ids == before.ids and awake.logprobs == before.logprobs

    events, held = [], []
    real_sleep, real_update, real_learn = FastEngine.sleep, FastEngine.update_weights, online_run.OnlineRun.learn

    def sleep(self):
        events.append("sleep")
        held.append(self)
        real_sleep(self)

    def update(self, policy):
        events.append("update")
        real_update(self, policy)

    def learn(*args):
        events.append("learn, engine asleep" if held and held[-1].layers is None else "learn, engine awake")
        return real_learn(*args)

    monkeypatch.setattr(FastEngine, "sleep", sleep)
    monkeypatch.setattr(FastEngine, "update_weights", update)
    monkeypatch.setattr(online_run.OnlineRun, "learn", learn)
    result, _ = one_round(task, tmp_path, "grpo", engine="fast")
    # built, asleep for scoring and learning, woken by the weight push (then sampled the final evaluation)
    assert events == ["update", "sleep", "learn, engine asleep", "update"]
    assert result.rounds[0]["engine_gap_mean"] < 1e-4  # and sampled from the policy's weights before it slept


def test_fast_engine_samples_a_lora_policy_with_its_adapters_merged(task):
    """The fast engine folds the adapters' B A * scaling into its own weight copy: its samples and log-probs equal
    those of the merged model, the policy's weights stay as they were, and an adapted embedding is refused."""
    from alignkit.config import LoraOptions
    from alignkit.errors import ConfigError
    from alignkit.generate.engines import FastEngine, make_engine
    from alignkit.models.lora import apply_lora

    peft_model = apply_lora(copy.deepcopy(task.model), LoraOptions(r=2))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    engine = make_engine(peft_model, task.tokenizer, SamplingOptions(engine="auto"))
    assert isinstance(engine, FastEngine)
    ids = encode_prompts(task.tokenizer, prompts(6, seed=8))
    cfg = SamplingOptions(max_new_tokens=8, temperature=1.0)
    ours = engine.generate(ids, cfg, 3, 3)
    merged = FastEngine(copy.deepcopy(peft_model).merge_and_unload(), task.tokenizer).generate(ids, cfg, 3, 3)
    base = FastEngine(task.model, task.tokenizer).generate(ids, cfg, 3, 3)
    assert ours.ids == merged.ids and ours.ids != base.ids
    np.testing.assert_allclose(np.concatenate([np.concatenate(g) for g in ours.logprobs]),
                               np.concatenate([np.concatenate(g) for g in merged.logprobs]), atol=1e-5)
    assert all(torch.equal(v, peft_model.state_dict()[k]) for k, v in state.items())
    embedded = apply_lora(copy.deepcopy(task.model), LoraOptions(r=2, target_modules=["q_proj", "embed_tokens"]))
    assert isinstance(make_engine(embedded, task.tokenizer, SamplingOptions(engine="auto")), HFEngine)
    with pytest.raises(ConfigError, match="sampling.engine"):
        make_engine(embedded, task.tokenizer, SamplingOptions(engine="fast"))


# ---- the vLLM engine, driven by a fake LLM ----


class FakeLogprob:
    def __init__(self, logprob):
        self.logprob = logprob


class FakeLLM:
    """Stands in for vllm.LLM: 'samples' by running the HF model greedily on the ids it is given, reports the
    log-probs the way vLLM does (a dict per position), and keeps the weights pushed into it."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.pushed, self.calls = copy.deepcopy(model), tokenizer, [], []
        self.events, self.sleeping = [], set()

    def load_weights(self, weights):
        assert "weights" not in self.sleeping, "weights pushed into discarded memory"
        self.events.append(("load", sorted(self.sleeping)))
        self.pushed.append(dict(weights))
        self.model.load_state_dict(dict(weights), strict=False)

    def sleep(self, level):  # level 2: weights and KV cache discarded (here: garbage, to catch a missed push)
        self.events.append(("sleep", level))
        self.sleeping = {"weights", "kv_cache"}
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tuple(tags)))
        self.sleeping -= set(tags)

    def generate(self, prompts, params, use_tqdm=True):
        from types import SimpleNamespace

        self.calls.append((prompts, params))
        engine = HFEngine(self.model, self.tokenizer)
        generation = engine.generate([p["prompt_token_ids"] for p in prompts],
                                     SamplingOptions(max_new_tokens=params.max_tokens, temperature=0), 1)
        results = []
        for ids, logps, reasons in zip(generation.ids, generation.logprobs, generation.finish_reasons):
            outputs = [SimpleNamespace(token_ids=ids[0], logprobs=[{t: FakeLogprob(lp)} for t, lp in zip(ids[0], logps[0])],
                                       finish_reason=reasons[0]) for _ in range(params.n)]
            results.append(SimpleNamespace(outputs=outputs))
        return results


class FakeParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def test_vllm_engine_data_flow_and_weight_push_with_a_fake_llm(task):
    from alignkit.config import LoraOptions
    from alignkit.generate.engines.vllm import VLLMEngine
    from alignkit.models.lora import apply_lora

    fake = FakeLLM(task.model, task.tokenizer)
    engine = VLLMEngine(fake, task.tokenizer, sampling_params=FakeParams, load_weights=fake.load_weights,
                        sleep_mode=True)
    questions = prompts(4, seed=11)
    cfg = SamplingOptions(max_new_tokens=9, temperature=0.8, top_k=5)
    rollout = generate_rollout(engine, task.tokenizer, questions, SENTIMENT, cfg, RolloutShape(2, 64, seed=7))
    sent, params = fake.calls[-1]
    assert [p["prompt_token_ids"] for p in sent] == encode_prompts(task.tokenizer, questions)  # ids in, not text
    assert (params.n, params.max_tokens, params.temperature, params.top_k, params.seed, params.logprobs) == \
        (2, 9, 0.8, 5, 7, 0)
    hf = HFEngine(task.model, task.tokenizer).generate(encode_prompts(task.tokenizer, questions),
                                                      SamplingOptions(max_new_tokens=9, temperature=0), 1)
    assert [e.response_ids for e in rollout.examples] == [[row[0], row[0]] for row in hf.ids]  # ids out, trained as is
    for engine_logps, row in zip(rollout.engine_logps, hf.logprobs):
        torch.testing.assert_close(engine_logps, torch.tensor(row[0] * 2), rtol=0, atol=1e-6)
    # the push after an update makes the engine sample from the new weights, as reloading would
    policy = copy.deepcopy(task.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    engine.sleep()  # the learner's turn: vLLM's weights and KV cache are freed, and sampling is refused
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(encode_prompts(task.tokenizer, questions), cfg, 1, 7)
    engine.update_weights(policy)  # wakes the weights, pushes into them, then wakes the KV cache
    assert fake.events == [("sleep", 2), ("wake_up", ("weights",)), ("load", ["kv_cache"]), ("wake_up", ("kv_cache",))]
    assert all(torch.equal(fake.pushed[-1][k], v) for k, v in policy.state_dict().items())
    after = generate_rollout(engine, task.tokenizer, questions, SENTIMENT, SamplingOptions(max_new_tokens=9, temperature=0),
                             RolloutShape(1, 64))
    reloaded = HFEngine(policy, task.tokenizer).generate(encode_prompts(task.tokenizer, questions),
                                                        SamplingOptions(max_new_tokens=9, temperature=0), 1)
    assert [e.response_ids[0] for e in after.examples] == [row[0] for row in reloaded.ids]
    # LoRA: the adapters are merged into the pushed base weights, under the base model's names; the policy keeps them
    lora = apply_lora(copy.deepcopy(task.model), LoraOptions(r=2))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    engine.update_weights(lora)
    pushed = fake.pushed[-1]
    assert sorted(pushed) == sorted(task.model.state_dict())
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert all(torch.allclose(pushed[k], merged[k], atol=1e-6) for k in merged)
    assert any("lora_B" in n and float(p.abs().sum()) > 0 for n, p in lora.named_parameters())  # still adapters


def test_mask_truncated_drops_the_loss_of_cut_samples(task, tmp_path):
    from alignkit.data.pack import pack
    from alignkit.models.logprobs import response_logprobs

    kept, seen = one_round(task, tmp_path / "mixed", "grpo", max_new_tokens=6, mask_truncated=True)
    plain, _ = one_round(task, tmp_path / "plain", "grpo", max_new_tokens=6)
    experience, finished = seen["experience"], seen["rollout"].finished
    assert 0 < float(finished.float().mean()) < 1 and torch.equal(experience.trained, finished)
    # the loss sees no token of a cut sample; a finished sample keeps all of its own
    batch = pack(experience.examples, list(range(len(experience.examples))), 512, task.tokenizer.pad_token_id)
    out = response_logprobs(task.model, batch)
    token_logps, token_mask = out.padded(batch)
    inputs = LossInputs(logps=out.seq_logps, lengths=out.lengths, token_logps=token_logps, token_mask=token_mask)
    experience.fill(inputs, batch)
    assert torch.equal(inputs.token_mask.any(-1), finished) and torch.equal(inputs.token_mask, token_mask &
                                                                            finished[..., None])
    assert kept.rounds[0]["grad_norm"] != pytest.approx(plain.rounds[0]["grad_norm"], rel=1e-6)
    with pytest.raises(Exception, match="mask_truncated"):
        one_round(task, tmp_path / "rloo", "rloo", mask_truncated=True)
