"""`alignkit eval`: model A against model B (or A alone) on a prompt set, written to JSON + HTML + PNG.

Measures: mean reward of each with the paired gain and its bootstrap interval; win rate of A over B under a
judge, in both orders, position-calibrated, with the positional consistency rate; KL of A to a reference on A's
samples; length statistics; reward accuracy on a preference set. Every number in the HTML tables is the JSON's,
formatted (`eval.json` holds them exactly)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from alignkit.config import SamplingOptions, Strict, load_command_config
from alignkit.data.load import load_records, write_jsonl_atomic
from alignkit.errors import AlignkitError, ConfigError, DataError
from alignkit.eval.judges import FunctionJudge, Judge, LLMJudge, RewardJudge, pairwise_win_rate
from alignkit.eval.kl import kl_summary, sequence_log_ratios
from alignkit.eval.metrics import bootstrap_mean_ci, length_stats, win_rate
from alignkit.eval.plots import plot_realign_sweep, plot_reward_histograms, plot_table
from alignkit.eval.prefill import (
    REFUSAL_MARKERS,
    check_attack_records,
    parse_prefix_lengths,
    prefill_attack,
    prefill_table,
)
from alignkit.eval.realign_sweep import parse_lambdas, realign_sweep
from alignkit.eval.report import write_html_report
from alignkit.eval.token_shift import token_shift, token_shift_html
from alignkit.eval.urial_row import (
    URIAL_TITLES,
    baselines_table,
    urial_label,
    urial_model_name,
    urial_responses,
)
from alignkit.generate.sample import sample
from alignkit.rewards.spec import load_object, load_reward


class EvalConfig(Strict):
    model: str | None = Field(None, description="model A (directory, alias or hub id); samples A's responses")
    baseline: str | None = Field(None, description="model B; also the KL reference unless `reference` is set")
    reference: str | None = Field(None, description="reference model for KL(A || reference)")
    prompts: str | None = Field(None, description="JSONL of {'prompt': ...}")
    responses: str | None = Field(None, description="A's responses: `alignkit generate` output, instead of sampling")
    baseline_responses: str | None = Field(None, description="B's responses, the same way")
    preferences: str | None = Field(None, description="pairs JSONL for reward accuracy")
    reward: str = Field("synthetic", description="reward spec (see rewards/spec.py)")
    judge: str = Field("reward", description="reward | llm:<model dir> | module:attr (a Judge or f(prompt, a, b))")
    split_merge: bool = False
    output_dir: str = "runs/eval"
    max_prompts: int | None = Field(None, gt=0)
    sampling: SamplingOptions = Field(default_factory=SamplingOptions, description="how responses are sampled")
    seed: int = 0
    realign_sweep: list[float] | None = Field(None, description="DeRa: lambdas to sample A realigned with the "
                                                                "reference at (0,0.25,...,1.5): reward, KL, length each")
    token_shift: bool = Field(True, description="with a baseline model: rank each token of A's answers under it "
                                                "(URIAL's unshifted / marginal / shifted shares, coloured in the report)")
    prefill_attack: list[int] | None = Field(None, description="deep safety alignment: token counts k (0,5,10,20) to "
                                                               "prefill from each prompt's harmful_completion; the "
                                                               "decline rate of A (and B) per k (eval/prefill.py)")
    urial: bool = Field(False, description="add the training-free baseline row: the baseline (or urial_model) "
                                           "prompted with the urial preset on the same prompts, sampling and seed; "
                                           "A's gain and judged win rate over it (eval/urial_row.py)")
    urial_model: str | None = Field(None, description="the base model the URIAL row prompts (default: baseline)")
    refusal_markers: list[str] = Field(default_factory=lambda: list(REFUSAL_MARKERS), min_length=1,
                                       description="a continuation holding one of these (any case) declines")

    @field_validator("realign_sweep", mode="before")
    @classmethod
    def _lambdas(cls, value):
        return parse_lambdas(value)

    @field_validator("prefill_attack", mode="before")
    @classmethod
    def _prefix_lengths(cls, value):
        return parse_prefix_lengths(value)


# ---------------------------------------------------------------------------------------------- measures


def reward_accuracy(reward, records: list[dict]) -> dict:
    """Share of preference pairs whose chosen response the reward scores higher (a tie counts half)."""
    prompts = [r["prompt"] for r in records]
    chosen, rejected = reward(prompts, [r["chosen"] for r in records]), reward(prompts, [r["rejected"] for r in records])
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(records)
    return {"accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / n,
            "margin": sum(margins) / n, "chosen_reward": sum(chosen) / n, "rejected_reward": sum(rejected) / n,
            "pairs": n}


@dataclass
class EvalExtras:
    """What the optional measures need: split-merge judging, the models of the KL (policy A and its reference,
    with the tokenizer, which also counts lengths in tokens), a preference set for reward accuracy, and the URIAL
    baseline's answers for the training-free row (eval/urial_row.py)."""

    split_merge: bool = False
    policy: Any = None
    reference: Any = None
    tokenizer: Any = None
    preferences: list[dict] | None = None
    shift_base: Any = None  # the base model of the token-shift report (eval/token_shift.py)
    urial_responses: list[str] | None = None  # the training-free baseline's answers (eval/urial_row.py)
    urial_name: str | None = None  # the model it prompted (the report's row label)


def paired_sections(prompts: list, responses: tuple[list[str], list[str]], rewards: tuple[list[float], list[float]],
                    judge: Judge, extras: EvalExtras) -> tuple[dict, dict, dict]:
    """A against one baseline on the same prompts: (reward comparison, the baseline's length, judged win rates)."""
    (responses_a, responses_b), (rewards_a, rewards_b) = responses, rewards
    gain, low, high = bootstrap_mean_ci([a - b for a, b in zip(rewards_a, rewards_b)])
    compared = {"mean_b": sum(rewards_b) / len(rewards_b), "gain": gain, "gain_ci_low": low, "gain_ci_high": high,
                "win_rate": win_rate(rewards_a, rewards_b)}
    return (compared, length_stats(responses_b, extras.tokenizer),
            pairwise_win_rate(judge, prompts, responses_a, responses_b, extras.split_merge))


def evaluate_responses(prompts: list, responses_a: list[str], reward, responses_b: list[str] | None = None,
                       judge: Judge | None = None, extras: EvalExtras | None = None) -> dict:
    """Every measure the inputs allow; sections are flat dicts of numbers (the report's tables)."""
    extras = extras or EvalExtras()
    if extras.urial_responses is not None and len(extras.urial_responses) != len(prompts):
        raise AlignkitError(f"urial_responses: {len(extras.urial_responses)} answers for {len(prompts)} prompts; "
                            "give one answer per prompt, in the prompts' order")
    policy, reference, tokenizer = extras.policy, extras.reference, extras.tokenizer
    preferences = extras.preferences
    rewards_a = reward(prompts, responses_a)
    summary: dict[str, Any] = {"reward": {"name": getattr(reward, "name", "reward"),
                                          "mean_a": sum(rewards_a) / len(rewards_a)}}
    summary["length_a"] = length_stats(responses_a, tokenizer)
    judge = judge or RewardJudge(reward)
    if responses_b is not None:
        rewards_b = reward(prompts, responses_b)
        compared, summary["length_b"], summary["judge"] = paired_sections(prompts, (responses_a, responses_b),
                                                                          (rewards_a, rewards_b), judge, extras)
        summary["reward"].update(compared)
        summary["rewards_b"] = rewards_b
    if extras.urial_responses is not None:
        rewards_urial = reward(prompts, extras.urial_responses)
        compared, summary["length_urial"], summary["judge_urial"] = paired_sections(
            prompts, (responses_a, extras.urial_responses), (rewards_a, rewards_urial), judge, extras)
        summary["urial"] = {"model": extras.urial_name or "B", "mean_a": summary["reward"]["mean_a"],
                            "mean_urial": compared.pop("mean_b"), **compared}
        summary["rewards_urial"] = rewards_urial
    if policy is not None and reference is not None:
        summary["kl"] = kl_summary(sequence_log_ratios(policy, reference, tokenizer, prompts, responses_a))
    if preferences:
        summary["reward_accuracy"] = reward_accuracy(reward, preferences)
    if extras.shift_base is not None:
        summary["token_shift"], summary["token_shift_tokens"] = token_shift(extras.shift_base, tokenizer, prompts,
                                                                            responses_a)
    summary["rewards_a"] = rewards_a
    return summary


# ---------------------------------------------------------------------------------------------- report

SECTION_TITLES = {"reward": "Reward (A vs B)", "judge": "Win rate of A over B under the judge (both orders)",
                  "kl": "KL(A || reference) on A's samples", "length_a": "Length of A's responses",
                  "length_b": "Length of B's responses", "reward_accuracy": "Reward accuracy on the preference set",
                  "token_shift": "Token shift: A's answer tokens by their rank under B (URIAL)", **URIAL_TITLES}


def format_value(value) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def report_tables(summary: dict) -> dict[str, list[list[str]]]:
    """caption -> rows [key, value]: every scalar of every section, under its JSON key."""
    return {SECTION_TITLES[name]: [["key", "value"]] + [[k, format_value(v)] for k, v in summary[name].items()]
            for name in SECTION_TITLES if name in summary}


def write_eval_report(out: str | Path, summary: dict, names: tuple[str, str] = ("A", "B"),
                      examples: list[dict] = ()) -> dict[str, Path]:
    """eval.json (exact numbers), rewards.png, win_rate.png (when there is a B), report.html embedding both."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json"}
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps({"names": {"a": names[0], "b": names[1]}, **summary}, indent=2))
    tmp.replace(paths["json"])
    series = {names[0]: summary["rewards_a"]}
    if "rewards_b" in summary:
        series[names[1]] = summary["rewards_b"]
    if "rewards_urial" in summary:
        series[urial_label(summary["urial"]["model"])] = summary["rewards_urial"]
    paths["rewards_png"] = plot_reward_histograms(series, out / "rewards.png", f"reward: {summary['reward']['name']}")
    images = [paths["rewards_png"]]
    if "judge" in summary:
        j = summary["judge"]
        rows = [["judge", "raw (A first)", "swapped (B first)", "calibrated", "consistency"],
                [j["judge"], *(f"{j[k]:.3f}" for k in ("win_rate_raw", "win_rate_swapped", "win_rate_calibrated",
                                                       "consistency_rate"))],
                ["reward", "", "", f"{summary['reward']['win_rate']:.3f}", ""]]
        paths["win_rate_png"] = plot_table(rows, out / "win_rate.png", f"win rate of {names[0]} over {names[1]}")
        images.append(paths["win_rate_png"])
    tables = report_tables(summary)
    if "urial" in summary:  # the eval table proper first: A against each baseline, the training-free one included
        tables = {"A against each baseline": baselines_table(summary, names), **tables}
    if "realign_sweep" in summary:
        sweep = summary["realign_sweep"]
        tables["DeRa sweep: A realigned with the reference at each lambda"] = [list(sweep[0])] + [
            [format_value(v) for v in row.values()] for row in sweep]
        paths["realign_sweep_png"] = plot_realign_sweep(sweep, out / "realign_sweep.png", "DeRa: reward against KL")
        images.append(paths["realign_sweep_png"])
    if "prefill_attack" in summary:
        tables["Prefill attack: decline rate with the first k tokens of a compliant answer prefilled [95% CI]"] = \
            prefill_table(summary["prefill_attack"], names)
        shown = summary["prefill_attack_examples"]
        tables["Prefill attack: continuations"] = [list(shown[0])] + [[str(v) for v in e.values()] for e in shown]
    blocks = {"Token shift: the answers of A, coloured by rank under B": token_shift_html(summary["token_shift_tokens"])} \
        if "token_shift" in summary else None
    paths["html"] = write_html_report(out / "report.html", f"alignkit eval: {names[0]} vs {names[1]}",
                                      tables, images, list(examples), blocks)
    return paths


# ---------------------------------------------------------------------------------------------- CLI


def load_judge(spec: str, reward) -> Judge:
    if spec == "reward":
        return RewardJudge(reward)
    if spec.startswith("llm:"):
        from alignkit.models.resolve import load_model_and_tokenizer

        return LLMJudge(*load_model_and_tokenizer(spec[4:]))
    obj = load_object(spec, "judge")
    if isinstance(obj, Judge):
        return obj
    if callable(obj):
        return FunctionJudge(obj, name=spec)
    raise ConfigError("judge", f"'{spec}' is neither a Judge nor a callable f(prompt, first, second)")


def read_responses(path: str) -> tuple[list, list[str]]:
    """(prompts, first response of each) from `alignkit generate` output (fields prompt + responses/completion)."""
    records = load_records(path, shape="prompts")
    prompts, responses = [], []
    for record in records:
        value = record.get("completion", (record.get("responses") or [None])[0])
        if not isinstance(value, str):
            raise DataError(path, record["_row"], "responses", "expected 'completion' or a non-empty 'responses' list "
                            "of strings", hint="use the output of `alignkit generate`")
        prompts.append(record["prompt"])
        responses.append(value)
    return prompts, responses


def run_prefill_attack(cfg: EvalConfig, policy, baseline, tokenizer) -> tuple[list[dict], list[dict]]:
    if policy is None or not cfg.prompts:
        raise ConfigError("prefill_attack", "needs model A (`--model`) and --prompts with harmful_completion")
    records = load_records(cfg.prompts, shape="prompts")[:cfg.max_prompts]
    check_attack_records(records, cfg.prompts)
    models = {"a": policy, **({"b": baseline} if baseline is not None else {})}
    return prefill_attack(models, tokenizer, records, cfg)


def example_rows(prompts: list, columns: dict[str, list[str] | None], count: int = 8) -> list[dict]:
    """The report's first `count` examples: each prompt (a chat: its last message) with the columns that exist."""
    present = {name: texts for name, texts in columns.items() if texts is not None}
    return [{"prompt": p if isinstance(p, str) else p[-1]["content"], **{name: texts[i] for name, texts in present.items()}}
            for i, p in enumerate(prompts[:count])]


def urial_row_responses(cfg: EvalConfig, name: str, baseline: tuple, prompts: list) -> list[str]:
    """The URIAL row's answers from model `name` (the loaded baseline (model, tokenizer) when it is that model),
    also written as `alignkit generate` output (urial_samples.jsonl, usable as --baseline_responses)."""
    from alignkit.models.resolve import load_model_and_tokenizer

    model, tokenizer = baseline if name == cfg.baseline else load_model_and_tokenizer(name)
    responses = urial_responses(model, tokenizer, prompts, cfg.sampling, cfg.seed)
    write_jsonl_atomic(Path(cfg.output_dir) / "urial_samples.jsonl",
                       [{"prompt": p, "responses": [r], "completion": r} for p, r in zip(prompts, responses)])
    return responses


def run_eval(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    cfg: EvalConfig = load_command_config(EvalConfig, config, overrides)
    from alignkit.models.resolve import load_model_and_tokenizer

    reward = load_reward(cfg.reward)
    urial_name = urial_model_name(cfg)  # refused here, before any model loads, when there is no model to prompt
    policy = baseline = tokenizer = tokenizer_b = None
    if cfg.model:
        policy, tokenizer = load_model_and_tokenizer(cfg.model)
    if cfg.baseline:
        baseline, tokenizer_b = load_model_and_tokenizer(cfg.baseline)
        tokenizer = tokenizer or tokenizer_b

    def responses_of(model, path, name):
        if path:
            return read_responses(path)
        if model is None:
            return None, None
        if not cfg.prompts:
            raise ConfigError("prompts", f"needed to sample {name}'s responses (or give {name}'s responses file)")
        prompts = [r["prompt"] for r in load_records(cfg.prompts, shape="prompts")][:cfg.max_prompts]
        return prompts, [s[0] for s in sample(model, tokenizer, prompts, cfg.sampling, seed=cfg.seed)]

    prompts, responses_a = responses_of(policy, cfg.responses, "model")
    if responses_a is None:
        raise ConfigError("model", "give model A (`--model`) or its responses (`--responses`)")
    prompts_b, responses_b = responses_of(baseline, cfg.baseline_responses, "baseline")
    prompts, responses_a = prompts[:cfg.max_prompts], responses_a[:cfg.max_prompts]
    if responses_b is not None:
        prompts_b, responses_b = prompts_b[:cfg.max_prompts], responses_b[:cfg.max_prompts]
        if prompts_b != prompts:
            raise AlignkitError("A's and B's responses answer different prompts (or in a different order)")
    reference = baseline
    if cfg.reference:
        reference, _ = load_model_and_tokenizer(cfg.reference)
    preferences = load_records(cfg.preferences, shape="pairs") if cfg.preferences else None
    responses_urial = urial_row_responses(cfg, urial_name, (baseline, tokenizer_b), prompts) if urial_name else None
    judge = load_judge(cfg.judge, reward) if responses_b or responses_urial else None
    summary = evaluate_responses(prompts, responses_a, reward, responses_b, judge,
                                 EvalExtras(cfg.split_merge, policy, reference, tokenizer, preferences,
                                            baseline if cfg.token_shift else None, responses_urial, urial_name))
    if cfg.realign_sweep:
        summary["realign_sweep"] = realign_sweep(policy, reference, tokenizer, prompts, reward, cfg)
    if cfg.prefill_attack:
        summary["prefill_attack"], summary["prefill_attack_examples"] = run_prefill_attack(cfg, policy, baseline,
                                                                                           tokenizer)
    names = (cfg.model or cfg.responses or "A", cfg.baseline or cfg.baseline_responses or "B")
    columns = {"A": responses_a, "B": responses_b, "URIAL (training-free)": responses_urial}
    paths = write_eval_report(cfg.output_dir, summary, names, example_rows(prompts, columns))
    return {"summary": summary, "paths": {k: str(v) for k, v in paths.items()}}
