"""Documented behaviour that had no test: every named reward spec (values, not only that it loads), module:attr
specs, bad specs, missing_eos_penalty in a rollout, and sft_weight's NLL term in the loss."""

from __future__ import annotations

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.rewards.spec import load_reward


def shout(prompt, response) -> float:  # a module:attr reward for the spec test
    return float(response.isupper())


def test_named_reward_specs_give_their_documented_values():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["I love this, it is wonderful!", "This is terrible and awful", "", " ".join(["word"] * 35) + "."]
    prompts = ["p"] * len(texts)
    analyzer = SentimentIntensityAnalyzer()
    vader = load_reward("vader")(prompts, texts)
    assert vader == [analyzer.polarity_scores(t)["compound"] for t in texts] and vader[0] > 0 > vader[1]
    length = load_reward("length")(prompts, texts)
    assert length == pytest.approx([0.0, 0.0, -1.0, -0.05 * 5])  # 30 words free, 0.05 a word past them, -1 if empty
    fmt = load_reward("format")(prompts, texts)
    assert fmt == [1.0, 0.0, 0.0, 1.0]
    combined = load_reward("align")(prompts, texts)
    assert combined == pytest.approx([v + n + 0.25 * f for v, n, f in zip(vader, length, fmt)])


def test_module_attr_specs_and_bad_specs():
    assert load_reward("test_untested_behaviours:shout")(["p", "p"], ["LOUD", "quiet"]) == [1.0, 0.0]
    ends = load_reward("alignkit.rewards.text:EndsCleanly")  # a class: instantiated with no arguments
    assert ends(["p"], ["Done."]) == [1.0]
    with pytest.raises(ConfigError, match="reward") as err:
        load_reward("no_such_reward")
    assert err.value.key == "reward"
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("no_such_module_x:f")
    with pytest.raises(ConfigError, match="neither a Reward nor a callable"):
        load_reward("alignkit.rewards.spec:NAMED")


def test_missing_eos_penalty_is_subtracted_from_samples_cut_short(task, one_thread):
    from alignkit.generate.sample import SamplingConfig
    from alignkit.online.rollout import generate_rollout
    from alignkit.rewards.base import FunctionReward
    from synthetic_task import prompts

    reward = FunctionReward(lambda p, r: float(len(r.split())))
    args = (task.model, task.tokenizer, prompts(8, seed=5), reward, 4, SamplingConfig(max_new_tokens=8, seed=1))
    plain = generate_rollout(*args)
    penalised = generate_rollout(*args, missing_eos_penalty=0.5)
    assert plain.examples[0].response_ids == penalised.examples[0].response_ids  # the same samples
    assert plain.finished.any() and (~plain.finished).any()  # both kinds present
    torch.testing.assert_close(penalised.rewards, plain.rewards - 0.5 * (~plain.finished).float())


def test_sft_weight_adds_the_chosen_responses_nll(task, one_thread):
    from alignkit.config import TrainConfig
    from alignkit.data import prepare_examples
    from alignkit.data.pack import pack
    from alignkit.data.synthetic import preference_records
    from alignkit.losses import build_options, get_loss
    from alignkit.train.loop import compute_losses
    from alignkit.train.reference import Reference, reference_logps

    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_records(6, seed=3)]
    examples = prepare_examples(records, task.tokenizer, "pairs", 64)
    pad = task.tokenizer.pad_token_id
    ref = Reference(*reference_logps(task.model, examples, 1024, 512, pad, use_cache=False))
    batch = pack(examples, list(range(len(examples))), 512, pad)
    spec = get_loss("dpo")
    opts = build_options(spec, {"beta": 0.1})
    base = TrainConfig(model="tiny", train_data="x.jsonl")
    with torch.no_grad():
        plain, _ = compute_losses(task.model, batch, examples, spec, opts, ref, base)
        weighted, metrics = compute_losses(task.model, batch, examples, spec, opts, ref,
                                           base.model_copy(update={"sft_weight": 0.5}))
    chosen_lengths = torch.tensor([len(e.response_ids[0]) for e in examples], dtype=torch.float32)
    nll = -metrics["logps/chosen"] / chosen_lengths  # the chosen response's per-token NLL
    torch.testing.assert_close(metrics["nll"], nll)
    torch.testing.assert_close(weighted, plain + 0.5 * nll)


@pytest.mark.parametrize("norm,clip", [("scale", 0.0), ("normalize", 0.5)])
def test_ppo_reward_scale_and_advantage_clip(norm, clip):
    """reward_norm scale: r / sigma of the running moments (no shift); advantage_clip: |A| <= c after whitening."""
    import numpy as np

    from alignkit.losses.online import PPOOptions
    from alignkit.online.advantages import (
        RunningMoments,
        gae,
        kl_shaped_rewards,
        masked_whiten,
        ppo_advantages,
    )

    g = torch.Generator().manual_seed(3)
    B, K, T = 2, 3, 5
    mask = torch.arange(T)[None, None] < torch.randint(2, T + 1, (B, K, 1), generator=g)
    scores = torch.randn(B, K, generator=g) * 3 + 1
    logps, ref, values = (torch.randn(B, K, T, generator=g) * mask for _ in range(3))
    opts = PPOOptions(reward_norm=norm, advantage_clip=clip, reward_clip=0.0, kl_coef=0.05)
    out = ppo_advantages(scores, logps, ref, values, mask, opts, RunningMoments())
    s = scores.numpy().astype(np.float64)
    normalised = s / s.std(ddof=1) if norm == "scale" else (s - s.mean()) / s.std(ddof=1)
    shaped = kl_shaped_rewards(torch.tensor(normalised, dtype=torch.float32), (logps - ref) * mask, mask, 0.05)
    advantages, returns = gae(shaped, values, mask, opts.gamma, opts.lam)
    expected = masked_whiten(advantages, mask)
    if clip:
        expected = expected.clamp(-clip, clip) * mask
        assert float(expected.abs().max()) == pytest.approx(clip)  # the clip binds in this case
    torch.testing.assert_close(out["advantages"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["returns"], returns, atol=1e-5, rtol=1e-5)


def test_a_bf16_autocast_training_step(task, one_thread):
    """precision bf16: the forward runs in bf16 (the loss differs from fp32's, a little), the weights stay fp32 and
    the optimizer step updates them."""
    import copy

    from alignkit.config import TrainConfig
    from alignkit.data import prepare_examples
    from alignkit.data.pack import pack
    from alignkit.data.synthetic import preference_records
    from alignkit.losses import build_options, get_loss
    from alignkit.train.loop import compute_losses
    from alignkit.train.reference import Reference, reference_logps
    from alignkit.train.step import autocast

    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_records(6, seed=4)]
    examples = prepare_examples(records, task.tokenizer, "pairs", 64)
    pad = task.tokenizer.pad_token_id
    model = copy.deepcopy(task.model)
    ref = Reference(*reference_logps(model, examples, 1024, 512, pad, use_cache=False))
    batch = pack(examples, list(range(len(examples))), 512, pad)
    spec, opts = get_loss("dpo"), build_options(get_loss("dpo"), {"beta": 0.1})
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # policy != reference: a non-trivial loss
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(model="tiny", train_data="x.jsonl", precision=precision)
        with autocast(cfg, model):
            losses, _ = compute_losses(model, batch, examples, spec, opts, ref, cfg)
        results[precision] = losses
    assert results["bf16"].dtype == torch.float32  # losses come back in fp32
    assert not torch.equal(results["bf16"], results["fp32"])  # bf16 matmuls ran
    torch.testing.assert_close(results["bf16"], results["fp32"], atol=5e-2, rtol=5e-2)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    results["bf16"].mean().backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight.detach(), before)


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_a_stop_string_that_is_a_special_token_stops_generation(task, one_thread, engine):
    """`stop: ["<|end|>"]`, a special token that decoding drops: matched as a token, generation ends on it, the
    sample keeps it as its last id (like an end token) and its text is what came before."""
    from alignkit.generate.engines import make_engine
    from alignkit.generate.sample import SamplingConfig

    tok = task.tokenizer
    end = tok.convert_tokens_to_ids("<|end|>")
    ids = [tok("<|user|>", add_special_tokens=False)["input_ids"]] * 6
    free_cfg = SamplingConfig(max_new_tokens=16, seed=2, engine=engine)
    free = make_engine(task.model, tok, free_cfg).generate(ids, free_cfg, 2)
    stop_cfg = SamplingConfig(max_new_tokens=16, seed=2, engine=engine, stop=("<|end|>",))
    stopped = make_engine(task.model, tok, stop_cfg).generate(ids, stop_cfg, 2)
    hits = 0
    for group_free, group_stop, texts, reasons in zip(free.ids, stopped.ids, stopped.texts, stopped.finish_reasons):
        for row_free, row_stop, text, reason in zip(group_free, group_stop, texts, reasons):
            if end in row_free:
                hits += 1
                cut = row_free.index(end) + 1
                assert row_stop == row_free[:cut] and reason == "stop"
                assert text == tok.decode(row_free[:cut - 1], skip_special_tokens=True).strip()
            else:
                assert row_stop == row_free
    assert hits >= 3  # the case exercises the stop


def test_weight_decay_is_decoupled_and_applied_once_per_step(task, tmp_path, one_thread):
    """AdamW's decoupled decay: after one step from the same start on the same batch, the weights with decay w
    differ from those without by exactly -lr * w * the starting weights (the Adam update itself is the same)."""
    import copy

    from alignkit.config import TrainConfig
    from alignkit.data.load import write_jsonl_atomic
    from alignkit.data.synthetic import preference_records
    from alignkit.train.loop import train

    write_jsonl_atomic(tmp_path / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                  for r in preference_records(8, seed=7)])
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    finals = {}
    for wd in (0.0, 0.1):
        cfg = TrainConfig(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), loss="dpo", max_steps=1,
                          learning_rate=1e-2, lr_schedule="constant", weight_decay=wd, max_length=64,
                          output_dir=str(tmp_path / f"wd{wd}"), progress=False, ref_cache=False)
        finals[wd] = train(cfg, copy.deepcopy(task.model), task.tokenizer).model.state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(finals[0.1][name] - finals[0.0][name], -1e-2 * 0.1 * start[name], atol=1e-7, rtol=1e-4)
    assert not torch.equal(finals[0.0][name], start[name])  # the step did move the weights


def test_online_dpo_pairs_all_trains_every_strictly_ordered_pair(task, tmp_path, one_thread):
    from test_online_guarantees import rollout_lines
    from test_online_guarantees import run as run_online_method

    result = run_online_method(task, "online-dpo", tmp_path, rounds=2, pairs="all")
    for row, line in zip(result.rounds, rollout_lines(tmp_path)):
        expected = sum(1 for rewards in line["rewards"] for a in rewards for b in rewards if a > b)
        assert row["examples"] == row["pairs"] == expected > 0
    best_worst = run_online_method(task, "online-dpo", tmp_path / "bw", rounds=1)
    assert best_worst.rounds[0]["pairs"] == sum(1 for rs in rollout_lines(tmp_path / "bw")[0]["rewards"]
                                                if max(rs) > min(rs))


def test_max_grad_norm_clips_the_step(task, tmp_path, one_thread):
    """grad_norm is logged before clipping; a clip far above it changes nothing (bit for bit), a tiny one changes the
    second step's update (AdamW's first step does not depend on the gradient's scale)."""
    import copy

    from alignkit.config import TrainConfig
    from alignkit.data.load import write_jsonl_atomic
    from alignkit.data.synthetic import preference_records
    from alignkit.train.logging import read_metrics
    from alignkit.train.loop import train

    write_jsonl_atomic(tmp_path / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                  for r in preference_records(16, seed=8)])
    finals, rows = {}, {}
    for name, clip in (("none", None), ("huge", 1e9), ("tiny", 1e-4)):
        cfg = TrainConfig(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), loss="dpo", max_steps=2,
                          learning_rate=1e-2, lr_schedule="constant", max_grad_norm=clip, max_length=64,
                          max_tokens_per_batch=200, output_dir=str(tmp_path / name), progress=False, ref_cache=False)
        finals[name] = train(cfg, copy.deepcopy(task.model), task.tokenizer).model.state_dict()
        rows[name] = read_metrics(tmp_path / name)
    assert rows["tiny"][0]["grad_norm"] == rows["none"][0]["grad_norm"] > 1e-4  # logged before the clip
    assert all(torch.equal(finals["huge"][k], finals["none"][k]) for k in finals["none"])
    assert any(not torch.allclose(finals["tiny"][k], finals["none"][k]) for k in finals["none"])


def test_warmup_ratio_sets_the_warmup_as_a_share_of_the_steps():
    from alignkit.config import TrainConfig
    from alignkit.train.step import lr_lambda

    ratio = lr_lambda(TrainConfig(model="m", warmup_ratio=0.25, lr_schedule="constant"), 8)
    steps = lr_lambda(TrainConfig(model="m", warmup_steps=2, lr_schedule="constant"), 8)
    assert [ratio(i) for i in range(8)] == [steps(i) for i in range(8)] == [1 / 3, 2 / 3] + [1.0] * 6
    both = lr_lambda(TrainConfig(model="m", warmup_steps=3, warmup_ratio=0.25, lr_schedule="constant"), 8)
    assert [both(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]  # the larger of the two wins


def test_epochs_visit_every_example_once_per_epoch_in_a_new_order(task, tmp_path, one_thread):
    """epochs: 2 plans each example once per epoch, reshuffled; the run's first epoch is the one-epoch run, bit for
    bit, and the second continues from it."""
    import copy

    from alignkit.config import TrainConfig
    from alignkit.data.load import write_jsonl_atomic
    from alignkit.data.synthetic import preference_records
    from alignkit.train.logging import read_metrics
    from alignkit.train.loop import plan_steps, train

    write_jsonl_atomic(tmp_path / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                  for r in preference_records(12, seed=9)])
    common = dict(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), loss="dpo", learning_rate=1e-2,
                  lr_schedule="constant", max_length=64, max_tokens_per_batch=100, progress=False, ref_cache=False)
    two = TrainConfig(epochs=2, output_dir=str(tmp_path / "two"), **common)
    steps = plan_steps(_examples(two, task.tokenizer), two)
    flat = [i for step in steps for mb in step for i in mb]
    assert sorted(flat) == sorted(list(range(12)) * 2)
    half = len(flat) // 2
    assert sorted(flat[:half]) == sorted(flat[half:]) == list(range(12)) and flat[:half] != flat[half:]
    rows = {}
    for name, epochs in (("one", 1), ("two", 2)):
        cfg = TrainConfig(epochs=epochs, output_dir=str(tmp_path / name), **common)
        train(cfg, copy.deepcopy(task.model), task.tokenizer)
        rows[name] = read_metrics(tmp_path / name)
    assert len(rows["two"]) == 2 * len(rows["one"]) == len(steps)
    assert [r["loss"] for r in rows["two"][:len(rows["one"])]] == [r["loss"] for r in rows["one"]]
    assert sum(r["examples"] for r in rows["two"]) == 24


def _examples(cfg, tokenizer):
    from alignkit.data import prepare_examples

    return prepare_examples(cfg.train_data, tokenizer, "pairs", cfg.max_length)


def test_grpo_epochs_and_minibatches_pass_over_each_rollout_once_per_epoch(task, tmp_path, one_thread, monkeypatch):
    """epochs: 2, minibatches: 2: four optimizer steps per round, each of half the round's groups (an example is a
    prompt with its k samples); each epoch's two minibatches partition the rollout, reshuffled between epochs; the first step's ratios are 1 (the policy
    that sampled), later ones not (the policy has moved)."""
    from alignkit.train.step import Stepper
    from test_online_guarantees import run as run_online_method

    seen = []
    real = Stepper.step

    def recording(self, micro_batches, n_examples, forward, carried=None):
        seen.append((n_examples, [i for mb in micro_batches for i in mb]))
        return real(self, micro_batches, n_examples, forward, carried)

    monkeypatch.setattr(Stepper, "step", recording)
    result = run_online_method(task, "grpo", tmp_path, rounds=2, prompts_per_round=8, num_samples=4, epochs=2,
                               minibatches=2, loss_options={"epsilon": 0.02})
    assert [row["updates"] for row in result.rounds] == [2 * 2, 2 * 2]
    assert len(seen) == 8
    for r in range(2):
        steps = seen[4 * r:4 * r + 4]
        assert [n for n, _ in steps] == [4, 4, 4, 4]
        for first, second in (steps[0:2], steps[2:4]):
            assert sorted(first[1] + second[1]) == list(range(8))
        assert steps[0][1] != steps[2][1]  # reshuffled for the second pass
    assert all(row["clip_fraction"] > 0 for row in result.rounds)  # later steps' ratios left the 2% band
