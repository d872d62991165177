"""The third main job: multi-turn tool use with RL on SmolLM2-135M-Instruct, on CPU, end to end.

generated arithmetic word problems (envs/arithmetic.py; one step by default, as the pilot chose: docs/agent_pilot.md)
-> `alignkit online` (GRPO) where every sample is a conversation with the ArithmeticTools environment: the model may
call the sandboxed `calculate` tool, reads its result, and answers; reward 1 for the exact answer -> the held-out
problems (numbers training never saw), talked through by the original and the trained model -> accuracy and
tool-call rate with bootstrap intervals, per-turn metrics -> table + HTML report with the training curves and
example conversations (tool calls, tool results)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from rich.console import Console
from rich.markup import escape

from alignkit.config import SamplingOptions, Strict, load_command_config
from alignkit.data.load import write_jsonl_atomic
from alignkit.envs import Limits, run_trajectories
from alignkit.envs.arithmetic import ArithmeticTools, arithmetic_sets
from alignkit.eval.metrics import bootstrap_mean_ci
from alignkit.eval.plots import plot_curves
from alignkit.eval.report import rich_table, write_html_report
from alignkit.generate.engines import make_engine
from alignkit.losses import loss_option_names
from alignkit.online.config import OnlineConfig, loss_name_of
from alignkit.online.run import OnlineInputs, run_online
from alignkit.recipes.stages import Stages, with_recipe_defaults

ENVIRONMENT = "alignkit.envs.arithmetic:ArithmeticTools"
# The training run: `alignkit online`'s keys with this job's defaults (model, seed, output_dir and the prompts are the
# job's). Settings from the pilot (benchmarks/agent_pilot.py).
ONLINE = {"method": "grpo", "model": "smollm2-135m-instruct", "prompts": "generated", "environment": ENVIRONMENT,
          "max_turns": 3, "max_length": 768, "rounds": 12, "prompts_per_round": 8, "num_samples": 8,
          "sampling": {"max_new_tokens": 64, "temperature": 1.0, "batch_size": 64, "engine_precision": "bf16"},
          "learning_rate": 5e-4, "lora": {"r": 16, "alpha": 32}, "precision": "bf16",
          # no KL term (with LoRA the reference is the adapters off); truncated IS against the bf16 engine
          "loss_options": {"kl_coef": 0.0, "tis_cap": 2.0},
          "eval_before_after": False, "save_every": 0, "progress": False}
SET_BY_RECIPE = ("model", "seed", "output_dir", "prompts", "eval_prompts")


class AgentConfig(Strict):
    model: str = "smollm2-135m-instruct"
    output_dir: str = "runs/agent"
    steps: int = Field(1, ge=1, le=2, description="arithmetic steps per problem: 1 (a product) or 2 (then a sum or "
                                                  "difference)")
    num_train_problems: int = Field(256, gt=0, description="generated training problems (seeded)")
    num_eval_problems: int = Field(64, gt=0, description="generated held-out problems (their own seeded numbers)")
    online: OnlineConfig = Field(default_factory=lambda: OnlineConfig(**ONLINE),
                                 description="the training run: online's keys (method grpo or another of its family, "
                                             "max_turns, --rounds, ... reach it too)")
    eval_sampling: SamplingOptions = Field(
        default_factory=lambda: SamplingOptions(max_new_tokens=64, temperature=0.7, batch_size=64,
                                                engine_precision="bf16"),
        description="the held-out conversations, before and after")
    eval_samples: int = Field(2, gt=0, description="conversations per held-out problem")
    seed: int = 0

    @field_validator("online", mode="before")
    @classmethod
    def _job_defaults(cls, values):
        return with_recipe_defaults(values, ONLINE, "online", SET_BY_RECIPE)


def _option_names(values: dict) -> set[str]:
    """The options of the method's loss (--kl_coef, --tis_cap), given at the top level."""
    online = {**ONLINE, **(values.get("online") if isinstance(values.get("online"), dict) else {})}
    method = values.get("method", online["method"])
    return loss_option_names(loss_name_of(method, online.get("loss"), online.get("consistency", "none")))


def converse(model, tokenizer, records: list[dict], cfg: AgentConfig) -> list:
    """cfg.eval_samples conversations per held-out problem with the model: trajectories, [problem][sample] flat."""
    engine = make_engine(model, tokenizer, cfg.eval_sampling)
    rows = [{**r, "_row": i + 1} for i, r in enumerate(records) for _ in range(cfg.eval_samples)]
    limits = Limits(max_turns=cfg.online.max_turns, max_tokens=cfg.online.max_length, require_reward=False,
                    seed=cfg.seed + 17)
    return run_trajectories(engine, tokenizer, [ArithmeticTools() for _ in rows], rows, cfg.eval_sampling, limits)


def outcomes(trajectories: list) -> dict:
    """Per conversation: correct (0/1) and called the tool (0/1); per assistant turn t: the share of conversations
    that reached it, called the tool in it, answered in it, and answered right in it."""
    correct = [float(t.reward == 1.0) for t in trajectories]
    called = [float(t.tool_calls > 0) for t in trajectories]
    n = max(len(trajectories), 1)
    turns = []
    for turn in range(max((t.turns for t in trajectories), default=0)):
        reached = [t for t in trajectories if t.turns > turn]
        replies = [_replies(t)[turn] for t in reached]
        answered = [t for t, m in zip(reached, replies) if not m.get("tool_calls") and not m.get("tool_call_errors")
                    and t.done and t.turns == turn + 1]
        turns.append({"turn": turn + 1, "reached": len(reached) / n,
                      "tool_call": sum(bool(m.get("tool_calls")) for m in replies) / n,
                      "malformed_call": sum(bool(m.get("tool_call_errors")) for m in replies) / n,
                      "answered": len(answered) / n, "answered_right": sum(t.reward == 1.0 for t in answered) / n})
    return {"correct": correct, "called": called, "turns": turns,
            "tool_errors": sum(t.tool_errors for t in trajectories) / n}


def _replies(trajectory) -> list[dict]:
    return [m for m in trajectory.messages if m["role"] == "assistant"]


def compare(before: dict, after: dict) -> dict:
    """Rates with bootstrap 95 % intervals, and the paired change (same problems, same sample slots and seeds)."""
    out = {}
    for key in ("correct", "called"):
        out[f"{key}_before"] = bootstrap_mean_ci(before[key])
        out[f"{key}_after"] = bootstrap_mean_ci(after[key])
        out[f"{key}_change"] = bootstrap_mean_ci([a - b for a, b in zip(after[key], before[key])])
    out["turns_before"], out["turns_after"] = before["turns"], after["turns"]
    out["tool_errors_before"], out["tool_errors_after"] = before["tool_errors"], after["tool_errors"]
    return out


def run_agent(config: str | Path | None = None, overrides: dict[str, Any] | None = None,
              console: Console | None = None) -> dict:
    cfg: AgentConfig = load_command_config(AgentConfig, config, overrides, _option_names)
    console = console or Console()
    train, held = arithmetic_sets(cfg.num_train_problems, cfg.num_eval_problems, cfg.seed, cfg.steps)
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
    online = cfg.online.model_copy(update={"model": cfg.model, "seed": cfg.seed, "output_dir": str(out / "online"),
                                           "prompts": str(out / "train.jsonl"), "eval_prompts": str(out / "eval.jsonl")})
    result = stages.run(f"{online.method}: {online.rounds} rounds x {online.prompts_per_round} problems x "
                        f"{online.num_samples} conversations",
                        lambda: run_online(online, model, tokenizer, OnlineInputs(train, held)))
    after = stages.run("held-out conversations (trained)", lambda: converse(result.model.eval(), tokenizer, held, cfg))
    summary = compare(outcomes(before), outcomes(after))
    summary.update(method=online.method, rounds=online.rounds, steps=cfg.steps, max_turns=online.max_turns,
                   conversations=online.rounds * online.prompts_per_round * online.num_samples,
                   eval_conversations=len(before), timings_s=stages.seconds, run_s=time.perf_counter() - tic)
    write_report(out, summary, (held, before, after), result.rounds, console)
    return summary


def _pct(ci) -> str:
    return f"{ci[0]:.1%} [{ci[1]:.1%}, {ci[2]:.1%}]"


def _points(ci) -> str:
    return f"{100 * ci[0]:+.1f} pts [{100 * ci[1]:+.1f}, {100 * ci[2]:+.1f}]"


def result_rows(s: dict) -> list[list[str]]:
    return [["metric (held-out problems)", "original", "trained", "change (95% CI)"],
            ["exact answer", _pct(s["correct_before"]), _pct(s["correct_after"]), _points(s["correct_change"])],
            ["called calculate", _pct(s["called_before"]), _pct(s["called_after"]), _points(s["called_change"])],
            ["tool errors per conversation", f"{s['tool_errors_before']:.2f}", f"{s['tool_errors_after']:.2f}", ""]]


def turn_rows(s: dict) -> list[list[str]]:
    """Per assistant turn, original -> trained: shares of all conversations."""
    rows = [["turn", "reached", "called the tool", "malformed call", "answered", "answered right"]]
    before, after = s["turns_before"], s["turns_after"]
    for t in range(max(len(before), len(after))):
        b = before[t] if t < len(before) else {}
        a = after[t] if t < len(after) else {}
        rows.append([str(t + 1)] + [f"{b.get(k, 0.0):.0%} -> {a.get(k, 0.0):.0%}"
                                    for k in ("reached", "tool_call", "malformed_call", "answered", "answered_right")])
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
    """conversations: (held-out records, the original's trajectories, the trained model's), [problem][sample] flat."""
    held, before, after = conversations
    rows, per_turn = result_rows(s), turn_rows(s)
    console.print(rich_table(f"SmolLM2-135M-Instruct, {s['method']} with the calculate tool ({s['conversations']} "
                             f"conversations, {s['run_s'] / 60:.1f} min)", rows))
    console.print(rich_table("per assistant turn (share of held-out conversations, original -> trained)", per_turn))
    k = len(before) // max(len(held), 1)
    examples = [{"problem": held[i]["prompt"][0]["content"], "answer": held[i]["answer"],
                 "original": conversation(before[i * k]), "trained": conversation(after[i * k])}
                for i in range(min(8, len(held)))]
    for e in examples[:2]:
        console.print(f"[bold]{escape(e['problem'])}[/] (answer {e['answer']})\n  original:\n{escape(e['original'])}"
                      f"\n  trained:\n{escape(e['trained'])}")
    curves = [{"step": r["round"], **r} for r in rounds]
    images = [plot_curves({"train": curves}, ["rollout_reward", "tool_calls", "turns"], out / "curves.png",
                          "rollout reward, tool calls and assistant turns per conversation, per round")]
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    write_jsonl_atomic(out / "conversations.jsonl",
                       [{"problem": held[i // k]["prompt"], "answer": held[i // k]["answer"], "original": b.messages,
                         "original_reward": b.reward, "trained": a.messages, "trained_reward": a.reward}
                        for i, (b, a) in enumerate(zip(before, after))])
    timing_rows = [["stage", "seconds"]] + [[name, f"{v:.1f}"] for name, v in s["timings_s"].items()]
    write_html_report(out / "report.html", f"alignkit agent: SmolLM2-135M-Instruct before and after {s['method']} "
                      f"with a calculate tool", {"Held-out results": rows, "Per assistant turn": per_turn,
                                                 "Time": timing_rows}, images, examples)
    console.print(f"report: {out / 'report.html'}  (numbers: {out / 'summary.json'})")
