"""The third main job: multi-turn RL on SmolLM2-135M-Instruct, on CPU, end to end, in one of the two shipped
environments (the pilots: docs/agent_pilot.md):
- `arithmetic` (the default): generated word problems with the sandboxed `calculate` tool; success: the exact answer.
  The RL run starts from a warm start, SFT on worked tool-call conversations (recipes/warm_start.py);
- `self-correction` (SCoRe): `make rl`'s constraint pairs (training wording) and held-out prompts; attempt 1, the
  checkers' verdict as a user turn naming each broken instruction, attempt 2; success: every constraint met on
  attempt 2.

-> `alignkit online` (GRPO) where every sample is a conversation with the environment -> the held-out records
(constraint combinations and topics, or numbers, training never saw), talked through by the original and the trained
model -> success and the environment's own rates with bootstrap intervals, per-turn metrics -> table + HTML report
with the training curves and example conversations (feedback turns, tool calls and results)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.markup import escape

from alignkit.config import SamplingOptions, Strict, load_command_config
from alignkit.data.load import load_records, write_jsonl_atomic
from alignkit.envs import Limits, run_trajectories
from alignkit.envs.arithmetic import ArithmeticTools, arithmetic_sets, demonstration_problems, worked_replies
from alignkit.envs.self_correction import SelfCorrection
from alignkit.errors import ConfigError
from alignkit.eval.metrics import bootstrap_mean_ci
from alignkit.eval.plots import plot_curves
from alignkit.eval.report import rich_table, write_html_report
from alignkit.generate.engines import make_engine
from alignkit.online.config import OnlineConfig
from alignkit.online.run import OnlineInputs, run_online
from alignkit.recipes.rl import PROMPT_SETS, TYPES, shipped
from alignkit.recipes.stages import Stages, online_option_names, percent_ci, points_ci, with_recipe_defaults
from alignkit.recipes.warm_start import WarmStart, demonstration_examples, run_warm_start
from alignkit.rewards.verifiable.prompts import prompt_sets


@dataclass(frozen=True)
class Task:
    """An environment as this job runs it: its factory (`environment:`), its turns, what counts as success per
    conversation, and, per conversation, the rates the report shows (name -> 0/1 or a fraction)."""

    environment: str
    make: Callable[[], object]
    max_turns: int
    rates: Callable[[object], dict[str, float]]
    turn_success: Callable[[object, int], bool]  # (trajectory, assistant turn index) -> succeeded at that turn


def _correction_rates(t) -> dict[str, float]:
    info = t.infos[-1] if t.infos and t.infos[-1].get("attempt") == 2 else {}
    first, second = bool(info.get("first_all_met")), bool(info.get("second_all_met"))
    return {"success": float(second), "first_all_met": float(first),
            "first_compliance": info.get("first_compliance", 0.0),
            "second_compliance": info.get("second_compliance", 0.0),
            # SCoRe's own measures of self-correction: the attempts' transitions
            "wrong_to_right": float(second and not first), "right_to_wrong": float(first and not second)}


def _correction_turn(t, turn: int) -> bool:
    info = t.infos[turn] if turn < len(t.infos) else {}
    return bool(info.get("all_met") if turn == 0 else info.get("second_all_met"))


def _arithmetic_rates(t) -> dict[str, float]:
    return {"success": float(t.reward == 1.0), "called_tool": float(t.tool_calls > 0)}


def _arithmetic_turn(t, turn: int) -> bool:
    return t.done and t.turns == turn + 1 and t.reward == 1.0


TASKS = {"self-correction": Task("alignkit.envs.self_correction:SelfCorrection", SelfCorrection, 2,
                                 _correction_rates, _correction_turn),
         "arithmetic": Task("alignkit.envs.arithmetic:ArithmeticTools", ArithmeticTools, 3, _arithmetic_rates,
                            _arithmetic_turn)}
RATE_NAMES = {"success": "success", "first_all_met": "all met, attempt 1", "first_compliance": "fraction met, attempt 1",
              "second_compliance": "fraction met, attempt 2", "called_tool": "called calculate",
              "wrong_to_right": "wrong on attempt 1, right on 2", "right_to_wrong": "right on attempt 1, wrong on 2"}

# The training run: `alignkit online`'s keys with this job's defaults (model, seed, output_dir, the prompts and the
# environment are the job's). Settings from the pilot (benchmarks/agent_pilot.py, docs/agent_pilot.md).
ONLINE = {"method": "grpo", "model": "smollm2-135m-instruct", "prompts": "set-by-the-job", "max_length": 768,
          # SCoRe's stage-II objective: r1 + r2 + alpha (r2 - r1), alpha 1 (envs/self_correction.py)
          "environment_reward": "sum",
          # every assistant token takes its conversation's advantage; per_turn (--turn_credit per_turn): each attempt
          # its own return, attempt 1 r1 + r2 + alpha (r2 - r1), attempt 2 r2 + alpha (r2 - r1) (online/turn_credit.py)
          "turn_credit": "conversation", "rounds": 12, "prompts_per_round": 5, "num_samples": 8,
          "sampling": {"max_new_tokens": 48, "temperature": 1.0, "batch_size": 64, "engine_precision": "bf16"},
          "learning_rate": 5e-4, "lora": {"r": 16, "alpha": 32}, "precision": "bf16",
          # no KL term (with LoRA the reference is the adapters off); truncated IS against the bf16 engine
          "loss_options": {"kl_coef": 0.0, "engine_correction": "token_truncate", "engine_ratio_max": 2.0},
          "eval_before_after": False, "save_every": 0, "progress": False}
SET_BY_RECIPE = ("model", "seed", "output_dir", "prompts", "eval_prompts", "environment", "max_turns")
# What differs by task (docs/agent_pilot.md): arithmetic starts from a warm start on worked tool calls and, to fit
# 10 minutes on 2 cores, trains 8 rounds x 4 records and is evaluated on 64 problems; self-correction keeps the
# shared ONLINE settings (12 rounds x 5 records) and 96 held-out prompts.
TASK_DEFAULTS = {"arithmetic": {"num_eval": 64, "warm_start": {}, "online": {"rounds": 8, "prompts_per_round": 4}},
                 "self-correction": {"num_eval": 96, "warm_start": {"examples": 0}, "online": {}}}


class AgentConfig(Strict):
    model: str = "smollm2-135m-instruct"
    output_dir: str = "runs/agent"
    task: Literal["arithmetic", "self-correction"] = Field("arithmetic", description="the environment")
    num_train: int = Field(512, gt=0, description="training records: the first of make rl's constraint pairs in "
                                                  "their training wording, or generated problems")
    num_eval: int = Field(96, gt=0, description="held-out records: the first of the shipped held-out prompts, or "
                                                "generated problems (default: 64 for arithmetic)")
    arithmetic_steps: int = Field(1, ge=1, le=2, description="arithmetic: 1 (a product) or 2 (then a sum or "
                                                             "difference)")
    online: OnlineConfig = Field(default_factory=lambda: OnlineConfig(**ONLINE),
                                 description="the training run: online's keys (method grpo or another of its family, "
                                             "--rounds, ... reach it too)")
    eval_sampling: SamplingOptions = Field(
        default_factory=lambda: SamplingOptions(max_new_tokens=48, temperature=0.7, batch_size=64,
                                                engine_precision="bf16"),
        description="the held-out conversations, before and after")
    eval_samples: int = Field(2, gt=0, description="conversations per held-out record")
    warm_start: WarmStart | None = Field(None, description="SFT on worked conversations before the RL run "
                                                           "(arithmetic; default there: on, else off)")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, values):
        """Each task's own defaults, under any key given (TASK_DEFAULTS)."""
        if not isinstance(values, dict):
            return values
        defaults = TASK_DEFAULTS.get(values.get("task", "arithmetic"), {"num_eval": 96, "warm_start": {}, "online": {}})
        out = {**values, "num_eval": values.get("num_eval", defaults["num_eval"])}
        if out.get("warm_start") is None:
            out["warm_start"] = defaults["warm_start"]
        if isinstance(out.get("online", {}), dict):
            out["online"] = {**defaults["online"], **out.get("online", {})}
        return out

    @field_validator("online", mode="before")
    @classmethod
    def _job_defaults(cls, values):
        return with_recipe_defaults(values, ONLINE, "online", SET_BY_RECIPE)

    @model_validator(mode="after")
    def _batch(self):
        if self.online.prompts_per_round > self.num_train:
            raise ConfigError("num_train", f"{self.num_train} training records for {self.online.prompts_per_round} "
                                           f"per round: give at least prompts_per_round")
        if self.task != "arithmetic" and self.warm_start.examples:
            raise ConfigError("warm_start.examples", f"worked conversations exist for the arithmetic task only, not "
                                                     f"{self.task}: set 0 or give --task arithmetic")
        return self


def records_of(cfg: AgentConfig) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records: the shipped constraint prompt sets, or generated problems (seeded)."""
    if cfg.task == "arithmetic":
        return arithmetic_sets(cfg.num_train, cfg.num_eval, cfg.seed, cfg.arithmetic_steps)
    # make rl's pairs in their training wording, without rl_train.jsonl's variety (other wordings, single
    # constraints): the self-correction pilot and the job's measured figures were made on these records
    train = prompt_sets(TYPES, PROMPT_SETS["n_train"], PROMPT_SETS["n_eval"], PROMPT_SETS["seed"])[0][:cfg.num_train]
    return train, load_records(shipped("rl_eval.jsonl"), shape="prompts")[:cfg.num_eval]


def converse(model, tokenizer, records: list[dict], cfg: AgentConfig) -> list:
    """cfg.eval_samples conversations per held-out record with the model: trajectories, [record][sample] flat."""
    task = TASKS[cfg.task]
    engine = make_engine(model, tokenizer, cfg.eval_sampling)
    rows = [{**r, "_row": i + 1} for i, r in enumerate(records) for _ in range(cfg.eval_samples)]
    return run_trajectories(engine, tokenizer, [task.make() for _ in rows], rows, cfg.eval_sampling, _limits(cfg))


def _limits(cfg: AgentConfig) -> Limits:
    return Limits(max_turns=TASKS[cfg.task].max_turns, max_tokens=cfg.online.max_length, require_reward=False,
                  reward=cfg.online.environment_reward, seed=cfg.seed + 17)


def outcomes(trajectories: list, task: Task) -> dict:
    """Per conversation: the task's rates; per assistant turn t, shares of all conversations: reached it, called a
    tool in it, wrote a malformed call, succeeded at it (all met / answered right)."""
    n = max(len(trajectories), 1)
    per = [task.rates(t) for t in trajectories]
    turns = []
    for turn in range(max((t.turns for t in trajectories), default=0)):
        reached = [t for t in trajectories if t.turns > turn]
        replies = [_replies(t)[turn] for t in reached]
        turns.append({"turn": turn + 1, "reached": len(reached) / n,
                      "tool_call": sum(bool(m.get("tool_calls")) for m in replies) / n,
                      "malformed_call": sum(bool(m.get("tool_call_errors")) for m in replies) / n,
                      "succeeded": sum(task.turn_success(t, turn) for t in reached) / n})
    return {"rates": {k: [p[k] for p in per] for k in (per[0] if per else {})}, "turns": turns,
            "tool_errors": sum(t.tool_errors for t in trajectories) / n}


def _replies(trajectory) -> list[dict]:
    return [m for m in trajectory.messages if m["role"] == "assistant"]


def compare(before: dict, after: dict, warm: dict | None = None) -> dict:
    """Rates with bootstrap 95 % intervals, and the paired changes (same records, same sample slots and seeds):
    after - before, and with a warm start, after - warm start and warm start - before."""
    out = {"rates": {}}
    for key, values in before["rates"].items():
        trained = after["rates"][key]
        out["rates"][key] = {"before": bootstrap_mean_ci(values), "after": bootstrap_mean_ci(trained),
                             "change": _paired(trained, values)}
        if warm is not None:
            started = warm["rates"][key]
            out["rates"][key].update(warm_start=bootstrap_mean_ci(started),
                                     change_over_warm_start=_paired(trained, started),
                                     warm_start_change=_paired(started, values))
    out["turns_before"], out["turns_after"] = before["turns"], after["turns"]
    out["tool_errors_before"], out["tool_errors_after"] = before["tool_errors"], after["tool_errors"]
    if warm is not None:
        out["turns_warm_start"], out["tool_errors_warm_start"] = warm["turns"], warm["tool_errors"]
    return out


def _paired(after: list[float], before: list[float]):
    return bootstrap_mean_ci([a - b for a, b in zip(after, before)])


def warm_start(model, tokenizer, cfg: AgentConfig, records: tuple[list[dict], list[dict]], stages: Stages):
    """The warm-started model and its held-out conversations: SFT on cfg.warm_start.examples worked conversations
    of problems outside both the training and the held-out records."""
    task, (train, held), out = TASKS[cfg.task], records, Path(cfg.output_dir)
    problems = demonstration_problems(cfg.warm_start.examples, train + held, cfg.seed, cfg.arithmetic_steps)
    examples = demonstration_examples(tokenizer, problems, task.make, worked_replies, cfg.online.sampling,
                                      _limits(cfg))
    write_jsonl_atomic(out / "warm_start.jsonl", [{**p, "replies": worked_replies(p)} for p in problems])
    settings, online = cfg.warm_start, cfg.online.model_copy(update={"model": cfg.model, "seed": cfg.seed})
    model = stages.run(f"warm start: SFT on {len(examples)} worked conversations x {settings.epochs} epoch(s)",
                       lambda: run_warm_start(model, tokenizer, examples, settings, online, out))
    return model, stages.run("held-out conversations (warm start)", lambda: converse(model.eval(), tokenizer, held,
                                                                                     cfg))


def run_agent(config: str | Path | None = None, overrides: dict[str, Any] | None = None,
              console: Console | None = None) -> dict:
    cfg: AgentConfig = load_command_config(AgentConfig, config, overrides, online_option_names(ONLINE))
    console, task = console or Console(), TASKS[cfg.task]
    train, held = records_of(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "train.jsonl", train)
    write_jsonl_atomic(out / "eval.jsonl", held)
    stages = Stages(console)
    tic = time.perf_counter()

    from alignkit.models.resolve import load_model_and_tokenizer

    model, tokenizer = stages.run("load model", lambda: load_model_and_tokenizer(cfg.model))
    initial = copy.deepcopy(model).eval()
    before = stages.run("held-out conversations (original)", lambda: converse(initial, tokenizer, held, cfg))
    warm = None
    if cfg.warm_start.examples:
        model, warm = warm_start(model, tokenizer, cfg, (train, held), stages)
    online = cfg.online.model_copy(update={"model": cfg.model, "seed": cfg.seed, "output_dir": str(out / "online"),
                                           "prompts": str(out / "train.jsonl"), "eval_prompts": str(out / "eval.jsonl"),
                                           "environment": task.environment, "max_turns": task.max_turns})
    result = stages.run(f"{online.method} in {cfg.task}: {online.rounds} rounds x {online.prompts_per_round} records "
                        f"x {online.num_samples} conversations",
                        lambda: run_online(online, model, tokenizer, OnlineInputs(train, held)))
    after = stages.run("held-out conversations (trained)", lambda: converse(result.model.eval(), tokenizer, held, cfg))
    summary = compare(outcomes(before, task), outcomes(after, task), outcomes(warm, task) if warm else None)
    summary.update(task=cfg.task, method=online.method, rounds=online.rounds, max_turns=task.max_turns,
                   conversations=online.rounds * online.prompts_per_round * online.num_samples,
                   eval_conversations=len(before), warm_start=cfg.warm_start.model_dump(), timings_s=stages.seconds,
                   run_s=time.perf_counter() - tic)
    write_report(out, summary, (held, before, after, warm), result.rounds, console)
    return summary


def result_rows(s: dict) -> list[list[str]]:
    """Per rate: original, (warm start,) trained, and the paired changes with their intervals."""
    warm = "turns_warm_start" in s
    rows = [["metric (held-out)", "original", *(["warm start"] if warm else []), "trained",
             "change (95% CI)" if not warm else "trained - original (95% CI)",
             *(["trained - warm start (95% CI)"] if warm else [])]]
    for key, r in s["rates"].items():
        rows.append([RATE_NAMES.get(key, key), percent_ci(r["before"]),
                     *([percent_ci(r["warm_start"])] if warm else []), percent_ci(r["after"]),
                     points_ci(r["change"]), *([points_ci(r["change_over_warm_start"])] if warm else [])])
    errors = [s["tool_errors_before"], *([s["tool_errors_warm_start"]] if warm else []), s["tool_errors_after"]]
    rows.append(["tool errors per conversation", *(f"{e:.2f}" for e in errors), *([""] * (len(rows[0]) - 1
                                                                                          - len(errors)))])
    return rows


def turn_rows(s: dict) -> list[list[str]]:
    """Per assistant turn, original -> (warm start ->) trained: shares of all conversations."""
    rows = [["turn", "reached", "called a tool", "malformed call", "succeeded"]]
    sides = [s["turns_before"], *([s["turns_warm_start"]] if "turns_warm_start" in s else []), s["turns_after"]]
    for t in range(max(map(len, sides))):
        at = [side[t] if t < len(side) else {} for side in sides]
        rows.append([str(t + 1)] + [" -> ".join(f"{x.get(k, 0.0):.0%}" for x in at)
                                    for k in ("reached", "tool_call", "malformed_call", "succeeded")])
    return rows


def conversation(trajectory) -> str:
    """A trajectory as the model saw it: one block per message, tool calls and results included."""
    lines = []
    for m in trajectory.messages:
        text = m.get("text", m.get("content", ""))
        lines.append(f"[{m['role']}] {text}")
    lines.append(f"(reward {trajectory.reward}, {trajectory.turns} turns, {trajectory.tool_calls} tool calls"
                 + (f", stopped by {trajectory.limit}" if trajectory.limit else "") + ")")
    return "\n".join(lines)


def write_report(out: Path, s: dict, conversations: tuple, rounds: list[dict], console: Console) -> None:
    """conversations: (held-out records, the original's trajectories, the trained model's, the warm-started model's
    or None), [record][sample] flat."""
    held, before, after, warm = conversations
    rows, per_turn = result_rows(s), turn_rows(s)
    console.print(rich_table(f"SmolLM2-135M-Instruct, {s['method']} in {s['task']} ({s['conversations']} "
                             f"conversations, {s['run_s'] / 60:.1f} min)", rows))
    console.print(rich_table("per assistant turn (share of held-out conversations, original -> "
                             f"{'warm start -> ' if warm else ''}trained)", per_turn))
    k = len(before) // max(len(held), 1)
    examples = [{"record": held[i]["prompt"][-1]["content"], "original": conversation(before[i * k]),
                 **({"warm start": conversation(warm[i * k])} if warm else {}), "trained": conversation(after[i * k])}
                for i in range(min(8, len(held)))]
    for e in examples[:2]:
        console.print(f"[bold]{escape(e['record'])}[/]\n  original:\n{escape(e['original'])}"
                      f"\n  trained:\n{escape(e['trained'])}")
    curves = [{"step": r["round"], **r} for r in rounds]
    images = [plot_curves({"train": curves}, ["rollout_reward", "turns", "response_length"], out / "curves.png",
                          "rollout reward, assistant turns and trained tokens per conversation, per round")]
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    write_jsonl_atomic(out / "conversations.jsonl",
                       [{"record": held[i // k], "original": b.messages, "original_reward": b.reward,
                         **({"warm_start": warm[i].messages, "warm_start_reward": warm[i].reward} if warm else {}),
                         "trained": a.messages, "trained_reward": a.reward}
                        for i, (b, a) in enumerate(zip(before, after))])
    timing_rows = [["stage", "seconds"]] + [[name, f"{v:.1f}"] for name, v in s["timings_s"].items()]
    write_html_report(out / "report.html", f"alignkit agent: SmolLM2-135M-Instruct before and after {s['method']} "
                      f"in {s['task']}", {"Held-out results": rows, "Per assistant turn": per_turn,
                                          "Time": timing_rows}, images, examples)
    console.print(f"report: {out / 'report.html'}  (numbers: {out / 'summary.json'})")
