"""Per-turn credit (`turn_credit: per_turn`): each assistant turn's tokens take the advantage of that turn's
reward-to-go, normalised over the group's conversations at the same turn index. Checked against a NumPy computation
of the rule on scripted conversations of 1 to 3 turns (forked or not), for the GRPO family and REINFORCE++; equal to
the conversation-level advantages where every conversation has one turn; the loss mask unchanged; the loss reading
the per-token advantages; SCoRe's returns in the self-correction environment; refused by name where it cannot apply.
TRL has no per-turn credit (its multi-turn GRPO gives a conversation one advantage), so NumPy is the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.config import load_command_config
from alignkit.envs import Limits, load_environment
from alignkit.envs.self_correction import SelfCorrection
from alignkit.errors import ConfigError
from alignkit.losses import LossInputs
from alignkit.losses.online import CISPOOptions, GRPOOptions, cispo_loss, group_advantages, grpo_loss
from alignkit.online import online_config
from alignkit.online.config import method_loss
from alignkit.online.env_rollout import EnvironmentSetup, environment_rollout
from alignkit.online.experience import reinforce_experience, rl_experience
from alignkit.online.rollout import RolloutShape, training_examples
from alignkit.recipes.agent import ONLINE as AGENT_ONLINE
from alignkit.recipes.agent import AgentConfig, online_option_names
from envs_support import CHAT_TEMPLATE, FORGETFUL_TEMPLATE, SAMPLING, ScriptedEngine, chat_tokenizer
from test_envs_train import UntilDone, round_context

pytestmark = pytest.mark.usefixtures("one_thread")

# Per record (its marker word), per conversation, its replies; UntilDone ends a conversation at "done" or turn 3 and
# rewards each reply with its words / 10. Record "two": 2, 1, 2 and 3 turns; record "three": 1, 3, 3 and 1.
SCRIPT = {"two": [["hello yes", "good answer done"], ["yes done"], ["no", "done"], ["no no", "yes", "the sum done"]],
          "three": [["yes yes done"], ["no", "yes", "done"], ["what", "try again", "good done"], ["done"]]}
ONE_TURN = {"two": [["yes done"], ["done"], ["hello yes done"], ["no no no done"]],
            "three": [["done"], ["done"], ["good done"], ["yes the sum done"]]}


def queues(script: dict) -> dict:
    """The engine's replies in the order the rollout asks: turn by turn, the conversations still going in order."""
    return {marker: [c[t] for t in range(3) for c in conversations if len(c) > t]
            for marker, conversations in script.items()}


def scripted_rollout(script: dict, template: str = CHAT_TEMPLATE):
    tokenizer = chat_tokenizer(template)
    limits = Limits(max_turns=3, require_reward=True, reward="sum")
    setup = EnvironmentSetup(load_environment(UntilDone, limits), limits)
    records = [{"question": "what is two", "_row": 1}, {"question": "what is three", "_row": 2}]
    k = len(script["two"])
    rollout = environment_rollout(ScriptedEngine(tokenizer, queues(script)), tokenizer, records, SAMPLING,
                                  RolloutShape(k, 256), setup)
    return tokenizer, rollout


def numpy_turn_advantages(rewards: list[list[float]], scale: bool) -> list[np.ndarray]:
    """The rule from its statement: G_t = sum_{s>=t} r_s; per turn index t, over the conversations that reached it,
    A = (G - mean) / (std_ddof1 + 1e-4) (scale) or G - mean; 0 where one conversation alone reached t."""
    returns = [np.cumsum(np.array(r, dtype=np.float64)[::-1])[::-1] for r in rewards]
    out = [np.zeros(len(g)) for g in returns]
    for t in range(max(len(g) for g in returns)):
        reached = [i for i, g in enumerate(returns) if len(g) > t]
        if len(reached) < 2:
            continue
        values = np.array([returns[i][t] for i in reached])
        centred = values - values.mean()
        for i, a in zip(reached, centred / (values.std(ddof=1) + 1e-4) if scale else centred):
            out[i][t] = a
    return out


def expected_tokens(script: dict, per_turn_values) -> list[list[np.ndarray]]:
    """[record][conversation] the value of each sampled token: a reply is its words and the end token."""
    return [[np.concatenate([[v] * (len(reply.split()) + 1) for reply, v in zip(replies, values)])
             for replies, values in zip(conversations, per_turn_values[b])]
            for b, conversations in enumerate(script.values())]


def conversation_tokens(flat: list[torch.Tensor], rollout) -> list[list[np.ndarray]]:
    """Per-example flat tensors -> [record][conversation], the segments of a forked conversation joined in order."""
    examples, _, rows = training_examples(rollout)
    k = len(examples[0].response_ids)
    out = [[[] for _ in range(k)] for _ in rollout.examples]
    for values, example, row in zip(flat, examples, rows):
        for i, part in enumerate(torch.split(values, example.trained_lengths)):
            out[row][i] += part.tolist()
    return [[np.array(c) for c in record] for record in out]


def per_turn_context(method: str, tokenizer, **options):
    ctx = round_context(method, tokenizer, **options)
    ctx.cfg.turn_credit = "per_turn"
    return ctx


def word_rewards(script: dict) -> list[list[list[float]]]:
    return [[[len(reply.split()) / 10 for reply in c] for c in conversations] for conversations in script.values()]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, FORGETFUL_TEMPLATE], ids=["plain", "forked"])
@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_grpo_per_turn_advantages_equal_numpy_on_conversations_of_one_to_three_turns(template, scale_rewards):
    tokenizer, rollout = scripted_rollout(SCRIPT, template)
    assert (rollout.forked is not None) == (template == FORGETFUL_TEMPLATE)
    experience = rl_experience(rollout, per_turn_context("grpo", tokenizer, scale_rewards=scale_rewards))
    expected = expected_tokens(SCRIPT, [numpy_turn_advantages(r, scale_rewards == "group")
                                        for r in word_rewards(SCRIPT)])
    got = conversation_tokens(experience.per_token["advantages"], rollout)
    for b in range(2):
        for i in range(4):
            np.testing.assert_allclose(got[b][i], expected[b][i], rtol=1e-5, atol=1e-6)
    assert got[0][3][-4:].tolist() == [0.0] * 4  # turn 3 of record "two": one conversation reached it


def test_reinforce_pp_per_turn_centres_each_turn_then_whitens_over_the_rollout():
    tokenizer, rollout = scripted_rollout(SCRIPT, FORGETFUL_TEMPLATE)
    experience = reinforce_experience(rollout, per_turn_context("reinforce++", tokenizer))
    centred = expected_tokens(SCRIPT, [numpy_turn_advantages(r, False) for r in word_rewards(SCRIPT)])
    every = np.concatenate([c for record in centred for c in record])
    whitened = [[(c - every.mean()) / every.std() for c in record] for record in centred]
    got = conversation_tokens(experience.per_token["advantages"], rollout)
    for b in range(2):
        for i in range(4):
            np.testing.assert_allclose(got[b][i], whitened[b][i], rtol=1e-5, atol=1e-5)


def test_with_one_turn_per_turn_equals_the_conversation_advantages_exactly():
    tokenizer, rollout = scripted_rollout(ONE_TURN)
    assert rollout.rewards.unique().numel() > 2  # the groups' rewards differ
    for scale_rewards in ("group", "none"):
        per_turn = rl_experience(rollout, per_turn_context("grpo", tokenizer, scale_rewards=scale_rewards))
        conversation = group_advantages(rollout.rewards, scale_rewards)
        for b, (example, flat) in enumerate(zip(per_turn.examples, per_turn.per_token["advantages"])):
            for i, part in enumerate(torch.split(flat, example.trained_lengths)):
                assert torch.equal(part, conversation[b, i].expand(len(part)))
    plain = reinforce_experience(rollout, round_context("reinforce++", tokenizer))
    per_turn = reinforce_experience(rollout, per_turn_context("reinforce++", tokenizer))
    assert all(torch.equal(a, b) for a, b in zip(plain.per_token["advantages"], per_turn.per_token["advantages"]))


def test_the_loss_mask_and_the_rest_of_the_experience_are_unchanged():
    tokenizer, rollout = scripted_rollout(SCRIPT, FORGETFUL_TEMPLATE)
    plain = rl_experience(rollout, round_context("grpo", tokenizer))
    per_turn = rl_experience(rollout, per_turn_context("grpo", tokenizer))
    assert "advantages" not in plain.per_token
    for a, b in zip(plain.examples, per_turn.examples):
        assert a.response_loss_masks == b.response_loss_masks and a.response_ids == b.response_ids
    assert [len(t) for t in per_turn.per_token["advantages"]] == [sum(e.trained_lengths) for e in per_turn.examples]
    assert all(torch.equal(a, b) for a, b in zip(plain.per_token["engine_token_logps"],
                                                 per_turn.per_token["engine_token_logps"]))
    assert torch.equal(plain.per_response["rewards"], per_turn.per_response["rewards"])


@pytest.mark.parametrize("loss, opts", [(grpo_loss, GRPOOptions(kl_coef=0.0)), (cispo_loss, CISPOOptions())])
def test_the_loss_reads_per_token_advantages(loss, opts):
    """Ratio 1 (one update per rollout): per token -A_t (grpo) or -A_t log pi_t (cispo, the weight detached), so the
    gradient per token is -A_t, each aggregated per seq-mean-token-mean (grpo) or token-mean (cispo)."""
    torch.manual_seed(0)
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 1]]], dtype=torch.bool)
    advantages = torch.tensor([[[0.5, 0.5, -1.0, 0.0], [2.0, -0.3, -0.3, -0.3]]]) * mask
    token_logps = (-torch.rand(1, 2, 4) * mask).requires_grad_()
    inputs = LossInputs(None, mask.sum(-1).float(), token_logps=token_logps, token_mask=mask,
                        rewards=torch.tensor([[0.0, 1.0]]), advantages=advantages)
    losses, _ = loss(inputs, opts)
    losses.sum().backward()
    a, m, logp = advantages.numpy()[0], mask.numpy()[0], token_logps.detach().numpy()[0]
    per_token = -a if loss is grpo_loss else -a * logp
    if opts.loss_aggregation == "seq-mean-token-mean":
        weights = 1 / m.sum(-1, keepdims=True) / 2
    else:
        weights = np.full_like(a, 1 / m.sum())
    np.testing.assert_allclose(float(losses[0].detach()), (per_token * m * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(token_logps.grad.numpy()[0], -a * m * weights, rtol=1e-5, atol=1e-7)


class HalfProgress(SelfCorrection):
    def __init__(self):
        super().__init__(alpha=0.5)


def test_self_correction_returns_are_score_s_stage_two_objective():
    """Attempt 1: r1 + r2 + alpha (r2 - r1); attempt 2: r2 + alpha (r2 - r1) (r: the fraction of constraints met)."""
    tokenizer = chat_tokenizer()
    row = {"prompt": [{"role": "user", "content": "what is two"}],
           "constraints": [{"type": "max_words", "n": 2}, {"type": "include", "words": ["good"]}], "_row": 1}
    limits = Limits(max_turns=2, require_reward=True, reward="sum")
    setup = EnvironmentSetup(load_environment(HalfProgress, limits), limits)
    replies = {"two": ["hello yes no", "good yes no", "good answer", "yes"]}  # r1 = 0, 0.5; r2 = 1, 0.5
    rollout = environment_rollout(ScriptedEngine(tokenizer, replies), tokenizer, [row], SAMPLING.model_copy(
        update={"max_new_tokens": 40}), RolloutShape(2, 256), setup)
    r1, r2 = np.array([0.0, 0.5]), np.array([1.0, 0.5])
    attempt2 = r2 + 0.5 * (r2 - r1)
    expected = [[r1[i] + attempt2[i], attempt2[i]] for i in range(2)]
    np.testing.assert_allclose(rollout.examples[0].extras["turn_returns"], expected)
    np.testing.assert_allclose(rollout.rewards[0].numpy(), [e[0] for e in expected])  # G_1: the conversation's reward


def test_turn_credit_is_refused_by_name_where_it_cannot_apply():
    base = {"model": "m", "prompts": "p.jsonl", "environment": "envs_support:Notebook", "environment_reward": "sum"}
    with pytest.raises(ConfigError, match="turn_credit"):
        online_config({**base, "method": "grpo", "turn_credit": "per_token"})
    for method in ("grpo", "dapo", "gspo", "cispo", "reinforce++"):
        assert method_loss(online_config({**base, "method": method, "turn_credit": "per_turn"}))
    for method in ("rloo", "ppo"):
        with pytest.raises(ConfigError, match=f"turn_credit.*which {method} does not take"):
            method_loss(online_config({**base, "method": method, "turn_credit": "per_turn"}))
    with pytest.raises(ConfigError, match="turn_credit.*set environment_reward: sum"):
        method_loss(online_config({**base, "method": "grpo", "turn_credit": "per_turn", "environment_reward": "final"}))
    with pytest.raises(ConfigError, match="turn_credit.*set an environment"):
        method_loss(online_config({"model": "m", "prompts": "p.jsonl", "method": "grpo", "turn_credit": "per_turn"}))


def test_the_agent_job_exposes_turn_credit_and_keeps_its_default():
    load = lambda overrides: load_command_config(AgentConfig, None, overrides, online_option_names(AGENT_ONLINE))  # noqa: E731
    assert load({}).online.turn_credit == "conversation"
    assert load({"turn_credit": "per_turn"}).online.turn_credit == "per_turn"
    assert load({"online.turn_credit": "per_turn"}).online.turn_credit == "per_turn"
    with pytest.raises(ConfigError, match="turn_credit"):
        load({"turn_credit": "per_token"})


@pytest.mark.parametrize("method", ["grpo", "reinforce++"])
def test_per_turn_credit_trains_through_alignkit_online(tmp_path, method, monkeypatch):
    """Parity's conversations take 1 to 3 turns, each rewarded: the run trains on per-token advantages."""
    from alignkit.online.methods import ONLINE_METHODS, OnlineMethod
    from test_envs_online import run_online_cli

    seen, entry = [], ONLINE_METHODS[method]
    monkeypatch.setitem(ONLINE_METHODS, method, OnlineMethod(
        entry.loss, lambda r, c: seen.append(entry.experience(r, c)) or seen[-1], entry.paper, turn_credit=True))
    rounds = run_online_cli(tmp_path, "envs_support:Parity", {}, method=method, max_turns=3, turn_credit="per_turn",
                            environment_reward="sum", sampling={"max_new_tokens": 7, "engine": "hf"})
    assert len(rounds) == 2 and all(np.isfinite(r["loss"]) for r in rounds) and max(r["turns"] for r in rounds) > 1
    assert len(seen) == 2 and all(len(torch.cat(e.per_token["advantages"]).unique()) > 2 for e in seen)
