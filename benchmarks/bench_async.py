"""Async rollouts against synchronous ones (alignkit online, `async: {max_staleness: N}`), in one process and with
Ray rollout workers.

    python benchmarks/bench_async.py               # SmolLM2-135M-Instruct: sync, async 1, async 4 on both settings
    python benchmarks/bench_async.py --model tiny  # a random tiny Llama with SmolLM2's tokenizer: a quick check
    python benchmarks/bench_async.py --contenders io-ray_sync,io-ray_async1 --reuse   # add contenders to the table
    python benchmarks/bench_async.py --contenders compute-sync,compute-async2,compute-async2p --out async_partial
    python benchmarks/bench_async.py --contenders io-sync,io-async2,io-async2p --out async_partial_io

Two settings, each contender (sync, max_staleness 1, max_staleness 4) in its own process, the same seed, prompts and
number of rounds:
- io: multi-turn tool use in bench_agent.py's calculator environment, each tool call waiting --tool-seconds (0.2 s:
  calculator_env.SlowCalculatorEnv), from bench_agent's warm start (SmolLM2 writes no tool call without it); GRPO,
  k conversations per problem, <= --max-turns turns, the exact-answer reward;
- compute: bench_grpo.py's single-turn GRPO setting (the shipped align prompts, VADER reward, <= 64 new tokens).
Both: full fine-tuning, fp32, temperature 1, beta 0.04, lr 1e-6, the fast engine, environments stepped on
env_workers 16 threads.

Reported per contender: trajectories/s over the whole run (wall clock from the first round's start to the last round's
end: async's look-ahead is not free time), the ratio to sync, the rollout reward (every round's; the last round's;
the same samples per run), `mismatch_kl` (mean over rounds: log pi_engine - log pi_old on the sampled tokens, the
sampler's staleness as the learner sees it), the learner's mean wait for a rollout (`time/wait_s`), tool calls per
conversation. ray_sync, ray_async1, ray_async4: the same, sampled by --ray-workers Ray rollout workers (`ray:
{rollout_workers: N}`, 1 CPU each, a local Ray the run starts), the learner and the environments in the driver.
On a shared machine give --threads 1: with 2 OpenMP threads per process a loaded 2-core machine ran the tiny check's
synchronous runs 5-7x slower. Writes benchmarks/results/async.{json,md} (--reuse keeps the contenders not rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # calculator_env, bench_agent, bench_grpo: in every process

from contenders import machine, print_result, run_in_own_process  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = {"sync": None, "async1": 1, "async4": 4}
MODES.update({f"ray_{mode}": staleness for mode, staleness in list(MODES.items())})  # sampled by Ray rollout workers
SETTINGS = ("io", "compute")
# partial rollouts (async2p: max_staleness 2, each round in 2 segments: of tokens, or of turns with the environment)
PARTIAL = {"async2": 2, "async2p": 2}
CONTENDERS = tuple(f"{setting}-{mode}" for setting in SETTINGS for mode in (*MODES, *PARTIAL))


def tiny_model(tokenizer):
    from alignkit.models.tiny import build_tiny_model

    return build_tiny_model("llama", len(tokenizer), seed=0, hidden=128, layers=4)


def io_run(args) -> tuple[dict, object, object, object]:
    """(config values, model, tokenizer, inputs) of the tool-use setting."""
    from bench_agent import _schema, problems, tool_tokenizer, warm_start

    from alignkit.models.resolve import load_model_and_tokenizer, resolve_model
    from alignkit.online import OnlineInputs
    from alignkit.rewards.verifiable.math import MathAnswer

    if args.model == "tiny":
        tokenizer = tool_tokenizer(resolve_model("smollm2-135m-instruct"))
        model = tiny_model(tokenizer)
    else:
        model, tokenizer = load_model_and_tokenizer(str(warm_start(args)))
    records = problems(args.io_prompts * args.rounds, seed=0)
    longest = max(len(tokenizer.apply_chat_template(r["prompt"], tools=[_schema()], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]) for r in records)
    values = {"environment": "calculator_env:SlowCalculatorEnv", "max_turns": args.max_turns,
              "prompts_per_round": args.io_prompts, "max_new_tokens": args.completion_tokens,
              "max_length": longest + 2 * args.max_turns * args.completion_tokens}  # every turn, and the tool replies
    return values, model, tokenizer, OnlineInputs(records, records[:1], MathAnswer().bind(records))


def compute_run(args) -> tuple[dict, object, object, object]:
    """(config values, model, tokenizer, inputs) of bench_grpo's single-turn setting."""
    from bench_grpo import prompts, vader_scores
    from transformers import AutoTokenizer

    from alignkit.models.resolve import load_model_and_tokenizer, resolve_model
    from alignkit.online import OnlineInputs
    from alignkit.rewards.base import FunctionReward

    if args.model == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
        model = tiny_model(tokenizer)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model)
    reward = FunctionReward(lambda prompt, response: vader_scores([response])[0], name="vader")
    values = {"prompts_per_round": args.prompts, "max_new_tokens": args.new_tokens, "max_length": 2048}
    return values, model, tokenizer, OnlineInputs(prompts(args.prompts * args.rounds), prompts(1), reward)


def run_contender(args, name: str) -> dict:
    import calculator_env
    import torch

    from alignkit.online import online_config, run_online
    from alignkit.online import run as online_run

    torch.set_num_threads(args.threads)
    calculator_env.SlowCalculatorEnv.tool_seconds = args.tool_seconds
    setting, mode = name.split("-")
    values, model, tokenizer, inputs = (io_run if setting == "io" else compute_run)(args)
    marks = []
    real_train, real_round = online_run.OnlineRun.train, online_run.OnlineRun.round

    def train(self):
        marks.append(time.perf_counter())  # the producer starts sampling inside the first round
        return real_train(self)

    def round_(self, round_index):
        out = real_round(self, round_index)
        marks.append(time.perf_counter())
        return out

    online_run.OnlineRun.train, online_run.OnlineRun.round = train, round_
    staleness = {**MODES, **PARTIAL}[mode]
    cfg = online_config({
        "method": "grpo", "model": args.model, "prompts": "-", "output_dir": tempfile.mkdtemp(), "rounds": args.rounds,
        "num_samples": args.k, "temperature": 1.0, "kl_coef": 0.04, "learning_rate": 1e-6, "eval_before_after": False,
        "progress": False, "max_tokens_per_batch": 4096, "seed": 0, "env_workers": 16, **values,
        **({"async": {"max_staleness": staleness, "partial": mode.endswith("p")}} if staleness is not None else {}),
        **({"ray": {"rollout_workers": args.ray_workers, "num_cpus_per_worker": 1}} if mode.startswith("ray_") else
           {})})
    result = run_online(cfg, model, tokenizer, inputs)
    rounds = result.rounds
    seconds = marks[-1] - marks[0]
    trajectories = len(rounds) * cfg.prompts_per_round * cfg.num_samples
    return {"seconds": seconds, "load_1min": os.getloadavg()[0], "rounds": len(rounds), "trajectories": trajectories,
            "trajectories_per_s": trajectories / seconds, "round_end_s": [m - marks[0] for m in marks[1:]],
            "rewards": [r["rollout_reward"] for r in rounds],
            "mismatch_kl": [r.get("mismatch_kl") for r in rounds],
            "staleness": [r.get("staleness", 0) for r in rounds],
            "wait_s": [r.get("time/wait_s") for r in rounds],
            "generate_s": [r["time/generate_s"] for r in rounds], "learner_s": [r["time/learner_s"] for r in rounds],
            "tool_calls": _mean(r.get("tool_calls") for r in rounds), "turns": _mean(r.get("turns") for r in rounds)}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(rows: dict, header: dict) -> str:
    lines = [f"# Async rollouts against synchronous ({header['model']}; one process, and Ray rollout workers)", "",
             f"{header['machine']}; torch {header['torch']}, {header['threads']} threads; a shared machine (other "
             f"jobs ran beside it: 1-minute load {header['load_1min']:.1f} at the end), each contender in its own "
             f"process, one run each, {header['rounds']} rounds. io: {header['io_prompts']} problems x k = "
             f"{header['k']} conversations per round, <= {header['max_turns']} turns, {header['completion_tokens']} "
             f"tokens per turn (a conversation's budget: the longest prompt + 2 x turns x that), each tool call "
             f"waiting {header['tool_seconds']} s, env_workers 16; compute: "
             f"{header['prompts']} prompts x k = {header['k']}, <= {header['new_tokens']} new tokens (bench_grpo's "
             f"setting). GRPO, fp32, full fine-tuning, temperature 1, beta 0.04, lr 1e-6, the fast engine; ray_*: "
             f"sampled by {header['ray_workers']} Ray rollout worker(s) (1 CPU each, a local Ray started by the run), "
             f"the learner in the driver. vs sync: against the one-process synchronous run of the setting. "
             f"Command: `{header['command']}`", "",
             "| setting | contender | s | trajectories/s | vs sync | reward, all rounds | reward, last round | "
             "mismatch KL (mean) | staleness (max) | learner wait/round | tool calls/conv. |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        setting, mode = name.split("-")
        sync = rows.get(f"{setting}-sync")
        ratio = f"{r['trajectories_per_s'] / sync['trajectories_per_s']:.2f}x" if sync else "–"
        lines.append(f"| {setting} | {mode} | {r['seconds']:.1f} | {r['trajectories_per_s']:.3f} | {ratio} | "
                     f"{_mean(r['rewards']):+.3f} | {r['rewards'][-1]:+.3f} | {_cell(_mean(r['mismatch_kl']), '.2e')} | "
                     f"{max(r['staleness'])} | {_cell(_mean(r['wait_s']), '.2f')} s | "
                     f"{_cell(r['tool_calls'], '.2f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct", help="or tiny: a random tiny Llama, a quick check")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="compute: prompts per round")
    parser.add_argument("--new-tokens", type=int, default=64, help="compute: new tokens per answer")
    parser.add_argument("--io-prompts", type=int, default=2, help="io: problems per round")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--completion-tokens", type=int, default=64, help="io: new tokens per turn")
    parser.add_argument("--tool-seconds", type=float, default=0.2, help="io: the wait in each tool call")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sft-examples", type=int, default=32, help="io: bench_agent's warm start")
    parser.add_argument("--sft-epochs", type=int, default=1)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--ray-workers", type=int, default=1, help="ray_* contenders: Ray rollout workers")
    parser.add_argument("--out", default="async", help="results file stem in benchmarks/results")
    parser.add_argument("--reuse", action="store_true", help="keep the other contenders' figures from the last run")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print_result(run_contender(args, args.one))
        return
    names = args.contenders.split(",")
    if args.model != "tiny" and any(n.startswith("io-") for n in names):
        from bench_agent import warm_start

        warm_start(args)  # made once, before the contenders' processes read it
    saved = RESULTS / f"{args.out}.json"
    rows = json.loads(saved.read_text())["contenders"] if args.reuse and saved.exists() else {}
    for name in names:
        rows[name] = run_in_own_process(__file__, name, args, skip=("out", "reuse"))
        print(name, json.dumps({k: rows[name][k] for k in ("seconds", "trajectories_per_s")}), flush=True)
        write(rows, args)  # after each contender: a run stopped part-way keeps what it measured


def write(rows: dict, args) -> None:
    import torch

    header = {"model": args.model, "machine": machine(),
              "torch": torch.__version__, "command": "python benchmarks/bench_async.py " + " ".join(sys.argv[1:]),
              "load_1min": os.getloadavg()[0],
              **{k: v for k, v in vars(args).items() if k not in ("one", "contenders", "out", "reuse")}}
    rows = {name: rows[name] for name in CONTENDERS if name in rows}  # the table's order
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"setup": header, "contenders": rows}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, header))
    print(markdown(rows, header), flush=True)

if __name__ == "__main__":
    main()
