"""Multi-turn tool use: TRL 1.16's GRPOTrainer(environment_factory=...) against alignkit online GRPO with an
environment, on the same TRL-style class (benchmarks/calculator_env.py), model, chat template, turns and sampling.

    python benchmarks/bench_agent.py        # SmolLM2-135M-Instruct, 2 prompts x 4 conversations, <= 3 turns

Setup, the same for both (each contender in its own process, 1 warm-up step then --steps timed):
- problems: alignkit's arithmetic word problems (envs/arithmetic.py), a system turn and the question; the tool is
  alignkit's sandboxed `calculate`, the reward 1 for the exact final number (alignkit's math checker);
- chat template: SmolLM2's template renders no tools and TRL refuses it ("does not support tool calling"), and TRL
  parses tool calls only through a tokenizer's response template, which TRL ships for a list of known templates,
  SmolLM2's not among them. SmolLM2 writes ChatML (<|im_start|>, <|im_end|>), so both get TRL's own Qwen2.5 ChatML
  template (Hermes-style <tool_call> blocks) and TRL's response template for it (add_response_schema), saved with
  the tokenizer; alignkit then renders tools through the template and parses replies with the same parser;
- the model: SmolLM2-135M-Instruct writes no <tool_call> block in this format (0 calls in 48 samples tried, with
  and without a worked example in the prompt), so a run would never reach a second turn. Both start from the same
  warm start: alignkit SFT on 32 worked tool-call conversations (other problems than the benchmark's), made once and
  kept in benchmarks/work/;
- full fine-tuning (no LoRA, as bench_grpo.py), fp32, k = 4 conversations per problem, temperature 1, beta 0.04,
  lr 1e-6, TRL's loss_type "grpo", no gradient checkpointing. TRL samples with transformers generate (no vLLM on
  CPU), alignkit with its fast engine;
- turns: TRL's max_tool_calling_iterations = max_turns - 1; token budget: TRL's max_completion_length C counts every
  turn and tool reply after the prompt (each generate call may write up to C), so alignkit gets max_new_tokens C
  per turn and max_length = the longest prompt + C.

Reported: trajectories/s, peak RSS (VmHWM), turns and tool calls per conversation, mean reward; for alignkit also
the share of its rollout time spent prefilling context the engine had already processed (the fast engine re-prefills
each conversation whole at every turn, and prefills each of a prompt's k copies at the first turn). Writes
benchmarks/results/agent.{json,md}. Not run in CI (needs trl: `.[bench]`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # calculator_env, for both contenders' processes

from contenders import machine, print_result, run_in_own_process  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ENVIRONMENT = "calculator_env:CalculatorEnv"
CONTENDERS = ("trl", "alignkit")


def problems(n: int, seed: int) -> list[dict]:
    """n arithmetic problems as rows: a system turn, the question, and the exact answer."""
    from alignkit.envs.arithmetic import arithmetic_sets

    train, _ = arithmetic_sets(n, 0, seed)
    return [{"prompt": [{"role": "system", "content": SYSTEM}, *r["prompt"]], "answer": r["answer"]} for r in train]


def worked_example(row: dict) -> list[dict]:
    """The conversation the warm start learns: one calculate call with the problem's expression, then the answer."""
    a, b, c = (int(x) for x in re.findall(r"\d+", row["prompt"][-1]["content"])[:3])
    expression = f"{a} * {b} {'-' if a * b - c == int(row['answer']) else '+'} {c}"
    call = {"type": "function", "function": {"name": "calculate", "arguments": {"expression": expression}}}
    return [*row["prompt"], {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculate", "content": row["answer"]},
            {"role": "assistant", "content": f"The answer is {row['answer']}."}]


def tool_tokenizer(path):
    """The tokenizer with TRL's Qwen2.5 ChatML template (it renders tools) and TRL's response template for it."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import add_response_schema, qwen2_5_chat_template, supports_tool_calling

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = qwen2_5_chat_template
    add_response_schema(tokenizer)
    assert supports_tool_calling(tokenizer)
    return tokenizer


def warm_start(args) -> Path:
    """benchmarks/work/smollm2-calc/final: SmolLM2 with the tool template, after a short SFT on worked tool calls
    (made once; its seconds are in warm_start.json)."""
    from calculator_env import CalculatorEnv
    from transformers.utils import get_json_schema

    from alignkit.api import train
    from alignkit.models.resolve import resolve_model

    root = WORK / "smollm2-calc"
    final = root / "sft" / "final"
    if (final / "config.json").exists():
        return final
    base = Path(resolve_model(args.model))
    tools_dir = root / "base"
    tools_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if not (tools_dir / name).exists():
            (tools_dir / name).symlink_to(base / name)
    tool_tokenizer(base).save_pretrained(tools_dir)
    schema = get_json_schema(CalculatorEnv().calculate)
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": worked_example(r), "tools": [schema]}) + "\n"
                            for r in problems(args.sft_examples, seed=1)))
    tic = time.perf_counter()
    train("sft", {"model": str(tools_dir), "train_data": str(data), "output_dir": str(root / "sft"),
                  "learning_rate": 5e-5, "epochs": args.sft_epochs, "max_length": 1024, "max_tokens_per_batch": 4096,
                  "warmup_steps": 1, "precision": "bf16", "progress": False, "seed": 0})
    tool_tokenizer(tools_dir).save_pretrained(final)  # the final tokenizer, response template included
    (root / "warm_start.json").write_text(json.dumps({"seconds": time.perf_counter() - tic, "examples":
                                                      args.sft_examples, "epochs": args.sft_epochs}))
    return final


def peak_rss_gb() -> float:
    """This process's peak RSS: VmHWM of its own address space. ru_maxrss would also count the pages a process
    shared with its parent between fork and exec (a parent that made the warm start in-process: 7.7 GB for both)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_trl(args, model_dir: Path) -> dict:
    import torch
    from calculator_env import CalculatorEnv, exact_answer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    steps = args.steps + 1
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.k,
                        num_generations=args.k, max_completion_length=args.completion_tokens,
                        max_tool_calling_iterations=args.max_turns - 1, temperature=1.0, beta=0.04,
                        learning_rate=1e-6, loss_type="grpo", max_steps=steps, logging_steps=1, report_to="none",
                        use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", seed=0,
                        dataloader_num_workers=0)
    turns: list[float] = []

    def reward(completions, answer, **kwargs):  # exact_answer, noting each conversation's assistant turns
        turns.extend(sum(m["role"] == "assistant" for m in c) for c in completions)
        return exact_answer(completions, answer)

    reward.__name__ = "exact_answer"
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_list(problems(args.prompts * steps * 4, seed=0)),
                          processing_class=tokenizer, environment_factory=CalculatorEnv, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    marks = [start, *times]
    step_s = [b - a for a, b in zip(marks, marks[1:])][1:]  # without the warm-up step
    logs = [entry for entry in trainer.state.log_history if "reward" in entry][1:]
    return {"s_per_step": sum(step_s) / len(step_s),
            "trajectories_per_s": args.prompts * args.k * len(step_s) / sum(step_s), "peak_rss_gb": peak_rss_gb(),
            "rewards": [e["reward"] for e in logs], "turns": _mean(turns[args.prompts * args.k:]),
            "tool_calls": _mean(e.get("tools/call_frequency") for e in logs),
            "completion_tokens": _mean(e.get("completions/mean_length") for e in logs)}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class PrefillMeter:
    """Times the fast engine's prefill and decode forwards, and splits the prefill of each generate call by token
    share into: context the engine had already run (a conversation's earlier turns: the previous context and the
    tokens sampled after it), copies of a prompt prefilled again in the same call (the k conversations of a record
    at their first turn), and new tokens."""

    def __init__(self):
        self.prefill_s = self.decode_s = self.generate_s = 0.0
        self.seen_s = self.duplicate_s = 0.0
        self.tokens = {"context": 0, "seen": 0, "duplicate": 0}
        self.known: list[list[int]] = []  # context + sampled ids of every earlier call: what the engine has run
        self.calls = 0

    def install(self) -> None:
        from alignkit.generate.engines.fast import FastEngine

        forward, generate, meter = FastEngine._forward, FastEngine.generate, self

        def timed_forward(engine, ids, positions, caches, write_at, key_mask, rope):
            tic = time.perf_counter()
            out = forward(engine, ids, positions, caches, write_at, key_mask, rope)
            seconds = time.perf_counter() - tic
            if write_at == 0:
                meter.prefill_s += seconds
                meter.call_prefill_s += seconds
            else:
                meter.decode_s += seconds
            return out

        def timed_generate(engine, prompt_ids, sampling, num_samples=1, seed=0):
            meter.call_prefill_s = 0.0
            tic = time.perf_counter()
            out = generate(engine, prompt_ids, sampling, num_samples, seed)
            meter.generate_s += time.perf_counter() - tic
            meter.account([list(c) for c in prompt_ids], [ids[0] for ids in out.ids] if num_samples == 1 else None)
            return out

        FastEngine._forward, FastEngine.generate = timed_forward, timed_generate

    def account(self, contexts: list[list[int]], responses) -> None:
        self.calls += 1
        seen = [max((len(s) - 1 for s in self.known if len(s) <= len(c) and c[:len(s)] == s), default=0)
                for c in contexts]
        first: set[tuple] = set()
        duplicate = []
        for context, already in zip(contexts, seen):
            key = tuple(context)
            duplicate.append(len(context) if not already and key in first else 0)
            first.add(key)
        total = sum(len(c) for c in contexts)
        self.tokens["context"] += total
        self.tokens["seen"] += sum(seen)
        self.tokens["duplicate"] += sum(duplicate)
        self.seen_s += self.call_prefill_s * sum(seen) / total
        self.duplicate_s += self.call_prefill_s * sum(duplicate) / total
        if responses is not None:
            self.known += [c + list(r) for c, r in zip(contexts, responses)]

    def report(self, rollout_s: float) -> dict:
        return {"engine_calls": self.calls, "generate_s": self.generate_s, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "reprefill_seen_s": self.seen_s, "reprefill_duplicate_s": self.duplicate_s,
                "rollout_s": rollout_s, "tokens": self.tokens,
                "prefill_share_of_rollout": self.prefill_s / rollout_s,
                "seen_share_of_rollout": self.seen_s / rollout_s,
                "duplicate_share_of_rollout": self.duplicate_s / rollout_s}


def run_alignkit(args, model_dir: Path) -> dict:
    import torch

    from alignkit.models.resolve import load_model_and_tokenizer
    from alignkit.online import OnlineInputs, online_config, run_online
    from alignkit.rewards.verifiable.math import MathAnswer

    torch.set_num_threads(args.threads)
    meter = PrefillMeter()
    meter.install()
    steps = args.steps + 1
    records = problems(args.prompts * steps * 4, seed=0)
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    longest = max(len(tokenizer.apply_chat_template(r["prompt"], tools=[_schema()], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]) for r in records)
    cfg = online_config({
        "method": "grpo", "model": str(model_dir), "prompts": "-", "output_dir": tempfile.mkdtemp(),
        "environment": ENVIRONMENT, "max_turns": args.max_turns, "rounds": steps, "prompts_per_round": args.prompts,
        "num_samples": args.k, "max_new_tokens": args.completion_tokens, "max_length": longest + args.completion_tokens,
        "temperature": 1.0, "kl_coef": 0.04, "learning_rate": 1e-6, "eval_before_after": False, "progress": False,
        "max_tokens_per_batch": 4096})
    result = run_online(cfg, model, tokenizer, OnlineInputs(records, records[:1], MathAnswer().bind(records)))
    timed = result.rounds[1:]
    seconds = [r["time/generate_s"] + r["time/reward_s"] + r["time/score_s"] + r["time/learner_s"] for r in timed]
    return {"s_per_step": sum(seconds) / len(seconds),
            "trajectories_per_s": args.prompts * args.k * len(seconds) / sum(seconds), "peak_rss_gb": peak_rss_gb(),
            "rewards": [r["rollout_reward"] for r in timed], "turns": _mean(r.get("turns") for r in timed),
            "tool_calls": _mean(r.get("tool_calls") for r in timed), "forks": sum(r.get("forks", 0) for r in timed),
            "generate_share": sum(r["time/generate_s"] for r in timed) / sum(seconds),
            "completion_tokens": _mean(r.get("generated_tokens") for r in timed) / (args.prompts * args.k),
            "prefill": meter.report(sum(r["time/generate_s"] for r in result.rounds))}


def _schema() -> dict:
    from calculator_env import CalculatorEnv
    from transformers.utils import get_json_schema

    return get_json_schema(CalculatorEnv().calculate)


def markdown(rows: dict, header: dict) -> str:
    trl = rows["trl"]
    lines = [f"# Multi-turn tool use: alignkit against TRL {header['trl']} GRPOTrainer(environment_factory) "
             f"({header['model']})", "",
             f"{header['machine']}; torch {header['torch']}, {header['threads']} threads; {header['prompts']} problems "
             f"x k = {header['k']} conversations per step, <= {header['max_turns']} turns, "
             f"{header['completion_tokens']} completion tokens (TRL: all turns; alignkit: per turn, and a conversation "
             f"budget of the longest prompt + {header['completion_tokens']}), temperature 1, beta 0.04, lr 1e-6, fp32, "
             f"full fine-tuning, no vLLM (TRL samples with transformers generate); 1 warm-up step, "
             f"{header['steps']} timed, each contender in its own process, one run. Both start from the warm start "
             f"({header['warm_start']}). Command: `{header['command']}`", "",
             "| contender | s/step | trajectories/s | vs TRL | peak RSS | vs TRL | turns | tool calls | "
             "sampled tokens | mean reward |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['s_per_step']:.2f} | {r['trajectories_per_s']:.3f} | "
                     f"{r['trajectories_per_s'] / trl['trajectories_per_s']:.2f}x | {r['peak_rss_gb']:.2f} GB | "
                     f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}x | {_cell(r.get('turns'))} | "
                     f"{_cell(r.get('tool_calls'))} | {_cell(r.get('completion_tokens'), '.0f')} | "
                     f"{sum(r['rewards']) / len(r['rewards']):+.3f} |")
    p = rows["alignkit"]["prefill"]
    lines += ["", "alignkit's rollout time (every round, the warm-up's included; the fast engine's forwards timed):", "",
              "| part | seconds | share of rollout time |", "|---|---:|---:|",
              f"| rollout (turns, tools, tokenising) | {p['rollout_s']:.2f} | 100% |",
              f"| engine prefill | {p['prefill_s']:.2f} | {100 * p['prefill_share_of_rollout']:.1f}% |",
              f"| of it, context already run at an earlier turn | {p['reprefill_seen_s']:.2f} | "
              f"{100 * p['seen_share_of_rollout']:.1f}% |",
              f"| of it, a prompt's copies at the first turn | {p['reprefill_duplicate_s']:.2f} | "
              f"{100 * p['duplicate_share_of_rollout']:.1f}% |",
              f"| engine decode | {p['decode_s']:.2f} | {100 * p['decode_s'] / p['rollout_s']:.1f}% |", "",
              f"Prefilled tokens: {p['tokens']['context']}, of which {p['tokens']['seen']} already run at an earlier "
              f"turn and {p['tokens']['duplicate']} repeated copies of a prompt (the prefill's seconds are split by "
              f"these token shares)."]
    return "\n".join(lines) + "\n"


def _cell(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--completion-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sft-examples", type=int, default=32)
    parser.add_argument("--sft-epochs", type=int, default=1)
    parser.add_argument("--model-dir", help="a model directory (with the tool template) instead of the warm start")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = Path(args.model_dir) if args.model_dir else warm_start(args)
    if args.one:
        result = (run_trl if args.one == "trl" else run_alignkit)(args, model_dir)
        print_result(result)
        return
    tic = time.perf_counter()
    rows = {}
    for name in args.contenders.split(","):
        rows[name] = run_in_own_process(__file__, name, args)
        print(name, rows[name], flush=True)
    import torch
    import trl

    warm = ({"examples": 0, "epochs": 0, "seconds": 0.0} if args.model_dir else
            json.loads((WORK / "smollm2-calc" / "warm_start.json").read_text()))
    header = {"model": args.model, "machine": machine(),
              "torch": torch.__version__, "trl": trl.__version__, "threads": args.threads, "prompts": args.prompts,
              "k": args.k, "max_turns": args.max_turns, "completion_tokens": args.completion_tokens,
              "steps": args.steps, "runs": 1, "contenders_seconds": time.perf_counter() - tic,
              "warm_start": f"alignkit SFT, {warm['examples']} worked tool calls x {warm['epochs']} epochs, bf16, "
                            f"{warm['seconds']:.0f} s",
              "command": "python benchmarks/bench_agent.py " + " ".join(sys.argv[1:]),
              "load_1min": os.getloadavg()[0]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "agent.json").write_text(json.dumps({"setup": header, "contenders": rows}, indent=2))
    (RESULTS / "agent.md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
