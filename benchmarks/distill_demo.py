"""Distillation on a real model: can distillation recover what dropping layers lost? Teacher: SmolLM2-135M-Instruct
(its base, not `make align`'s output). Student: the teacher without the block of 6 consecutive decoder layers that
changes its input least on the teacher's own answers (Gromov et al. 2024: alignkit.models.cut.most_similar_block; 24
of 30 kept, weights copied; embeddings, norm and head kept: alignkit.models.cut.drop_layers), or with --drop_block 0
every n-th layer dropped (--drop_every). Three ways to train the student, at equal
samples (each sees rounds x prompts_per_round x num_samples completions of the same training prompts, in as many
optimizer steps, at the same learning rate):

  opd   on-policy distillation: `alignkit distill --loss opd --lmbda 1` (the student samples, the teacher's log-probs
        of its tokens are the advantage)
  gkd   GKD: `alignkit distill --loss gkd --lmbda 0.5 --seq_kd true --beta 0.5` (each round sampled by the student
        with probability 0.5, else by the teacher; generalized JSD over the vocabulary)
  sft   SFT on teacher samples: the teacher samples the same prompts once, then `alignkit train --loss sft`

Evaluated on held-out prompts (the shipped align prompts, split seeded and disjoint) for the teacher, the cut student
and each trained student, on each model's own samples at temperature 1: the per-token reverse KL to the teacher (mean
over sampled tokens of log pi_S - log pi_T), the teacher's per-token NLL of them, and the teacher's reward (`make
align`'s: VADER sentiment + length + ends cleanly), with bootstrap 95% intervals of trained - cut.

    python benchmarks/distill_demo.py --rounds 2 --prompts_per_round 2 --eval_prompts 4    # smoke run
    python benchmarks/distill_demo.py                                                      # the full demo

Writes OUTPUT/summary.json, benchmarks/results/distill_demo.md and .png (--results). Not run in CI."""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

METHODS = ("opd", "gkd", "sft")


def split_prompts(seed: int, n_eval: int) -> tuple[list, list]:
    """(train, held-out) prompts of the shipped align set: one seeded shuffle, disjoint."""
    from alignkit.data.load import load_records

    prompts = [r["prompt"] for r in load_records(str(resources.files("alignkit") / "assets" / "align_prompts.jsonl"),
                                                 shape="prompts")]
    random.Random(seed).shuffle(prompts)
    return prompts[n_eval:], prompts[:n_eval]


def sampling_options(args, batch_size: int = 32):
    from alignkit.config import SamplingOptions

    # temperature 1, no top-p: the samples are the model's own distribution, so log pi_S - log pi_T estimates the KL
    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, batch_size=batch_size,
                           engine_precision="bf16" if args.precision == "bf16" else "fp32")


def common_keys(args, out: Path, name: str) -> dict:
    keys = {"output_dir": str(out / name), "learning_rate": args.learning_rate, "lr_schedule": "constant",
            "precision": args.precision, "seed": args.seed, "max_length": 256, "progress": False,
            "report_to": ["jsonl"]}
    if args.lora_r:
        keys["lora"] = {"r": args.lora_r}
    return keys


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_online_method(args, name: str, student_dir: Path, train_file: Path, out: Path):
    from alignkit.recipes.distill import run_distill

    options = {"opd": {"loss": "opd", "lmbda": 1.0},
               "gkd": {"loss": "gkd", "lmbda": args.gkd_lmbda, "seq_kd": True, "beta": args.gkd_beta}}[name]
    overrides = {**common_keys(args, out, name), **options, "model": str(student_dir), "teacher": args.teacher,
                 "prompts": str(train_file), "reward": "align", "rounds": args.rounds,
                 "prompts_per_round": args.prompts_per_round, "num_samples": args.num_samples,
                 "sampling": sampling_options(args).model_dump(), "eval_before_after": False}
    return run_distill(None, overrides).model


def teacher_samples(args, teacher, tokenizer, train_prompts: list, out: Path) -> tuple[Path, int]:
    """The teacher's completions of the prompts the online runs see (the same seeded order), num_samples each, as SFT
    records; also the token budget of one optimizer step so that the epoch takes about `rounds` steps."""
    from alignkit.data.load import write_jsonl_atomic
    from alignkit.generate.engines import encode_prompts
    from alignkit.generate.sample import sample_with_counts
    from alignkit.online.sampling import prompt_order

    order = prompt_order(len(train_prompts), args.rounds * args.prompts_per_round, args.seed)
    prompts = [train_prompts[i] for i in order]
    samples = sample_with_counts(teacher, tokenizer, prompts, sampling_options(args), args.num_samples, args.seed)
    records = [{"prompt": p, "completion": text} for p, group in zip(prompts, samples.texts) for text in group]
    path = out / "teacher_samples.jsonl"
    write_jsonl_atomic(path, records)
    prompt_tokens = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    tokens = sum(n * args.num_samples + sum(g) + args.num_samples for n, g in zip(prompt_tokens, samples.num_tokens))
    return path, tokens // args.rounds + max(prompt_tokens) + args.max_new_tokens + 1


def run_sft(args, student_dir: Path, data: Path, step_tokens: int, out: Path):
    from alignkit.config import TrainConfig
    from alignkit.train.loop import train

    cfg = TrainConfig(**common_keys(args, out, "sft"), model=str(student_dir), loss="sft", train_data=str(data),
                      epochs=1, max_tokens_per_batch=step_tokens, data_cache=False, ref_cache=False)
    return train(cfg).model


def evaluate(model, teacher, tokenizer, prompts: list, args) -> dict:
    """On the model's own samples of the held-out prompts: per answer, the summed log pi_S - log pi_T, the teacher's
    summed NLL, the token count and the reward; scored token-exactly (the sampled ids) in fp32."""
    from alignkit.data.tokenize import TokenizedExample
    from alignkit.eval.kl import kl_packing
    from alignkit.generate.engines import encode_prompts
    from alignkit.generate.sample import sample_with_counts
    from alignkit.rewards.spec import default_reward
    from alignkit.train.packing import pad_token_id
    from alignkit.train.reference import score_examples

    out = sample_with_counts(model, tokenizer, prompts, sampling_options(args), args.eval_samples, args.seed + 1)
    ids = out.extra["generation"].ids
    examples = [TokenizedExample(list(p), [list(r) or [tokenizer.eos_token_id]])
                for p, group in zip(encode_prompts(tokenizer, prompts), ids) for r in group]
    packing = kl_packing(pad_token_id(tokenizer), "fp32")
    own, teacher_logps = (score_examples(m.float(), examples, packing)[1] for m in (model, teacher))
    texts = [t for group in out.texts for t in group]
    rewards = default_reward()([p for p in prompts for _ in range(args.eval_samples)], texts)
    return {"log_ratio": [float((a - b).double().sum()) for a, b in zip(own, teacher_logps)],
            "teacher_nll": [-float(b.double().sum()) for b in teacher_logps],
            "tokens": [len(b) for b in teacher_logps], "reward": list(map(float, rewards)), "texts": texts}


def per_token(values: list[float], tokens: list[int]) -> float:
    return sum(values) / sum(tokens)


def gains(trained: dict, cut: dict) -> dict:
    """Trained - cut, paired by prompt and sample index, with bootstrap 95% intervals: the reward, and the per-answer
    per-token KL and teacher NLL (the table's KL is token-weighted; the interval is over answers)."""
    from alignkit.eval.metrics import bootstrap_mean_ci

    def values(run, key):
        return run[key] if key == "reward" else [v / n for v, n in zip(run[key], run["tokens"])]

    return {key: bootstrap_mean_ci([a - b for a, b in zip(values(trained, key), values(cut, key))])
            for key in ("log_ratio", "teacher_nll", "reward")}


def run_counts(out: Path) -> dict:
    """From the runs' metrics.jsonl: GKD's rounds by source, the SFT epoch's optimizer steps."""
    def rows(name):
        path = out / name / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    counts = {}
    if rows("gkd"):
        counts["GKD rounds student / teacher sampled"] = "{} / {}".format(
            *(int(sum(r.get(k, 0) for r in rows("gkd"))) for k in ("student_sampled", "teacher_sampled")))
    if rows("sft"):
        counts["SFT optimizer steps"] = max(r["step"] for r in rows("sft"))
    return counts


def row(name: str, run: dict, gain: dict | None, seconds: float | None) -> str:
    kl, nll = per_token(run["log_ratio"], run["tokens"]), per_token(run["teacher_nll"], run["tokens"])
    reward = sum(run["reward"]) / len(run["reward"])

    def ci(key):
        if gain is None:
            return ""
        mean, low, high = gain[key]
        return f" ({mean:+.3f} [{low:+.3f}, {high:+.3f}])"

    words = sum(len(t.split()) for t in run["texts"]) / len(run["texts"])
    time_s = f"{seconds:.0f}" if seconds is not None else ""
    return (f"| {name} | {kl:.3f}{ci('log_ratio')} | {nll:.3f}{ci('teacher_nll')} | {reward:+.3f}{ci('reward')} | "
            f"{words:.1f} | {time_s} |")


def write_results(args, summary: dict) -> None:
    """The table, settings and timings as markdown, and the PNG, from summary.json's content."""
    evals, gain, seconds = summary["evals"], summary["gains"], summary["seconds"]
    settings = {**summary["settings"], **run_counts(args.output_dir)}
    header = ["| model | KL(student ‖ teacher), nats/token (trained − cut [95% CI]) | teacher NLL of the samples, "
              "nats/token | teacher's reward | words | train s |", "|---|---|---|---|---|---|"]
    names = {"teacher": "teacher (30 layers)", "cut": "cut student, untrained",
             "opd": "on-policy distillation (opd, λ 1)", "gkd": f"GKD (λ {args.gkd_lmbda}, β {args.gkd_beta}, seq_kd)",
             "sft": "SFT on teacher samples"}
    lines = [row(names[k], evals[k], gain.get(k), seconds.get(k)) for k in evals]
    text = [f"# Distillation demo: SmolLM2-135M-Instruct → a student of its {settings['student'].split(' (')[0]}", "",
            f"Command: `{settings['command']}`", "", *header, *lines, "",
            "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if k != "command"), "",
            "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), "",
            *examples(args, evals, names)]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".md").write_text("\n".join(text))
    plot(evals, names, args.results.with_suffix(".png"))
    print("\n".join(text))


def examples(args, evals: dict, names: dict, shown: int = 3) -> list[str]:
    """The first answer of each model to the first `shown` held-out prompts (newlines escaped)."""
    _, prompts = split_prompts(args.seed, args.eval_prompts)
    per_prompt = len(evals["cut"]["texts"]) // len(prompts)
    lines = ["## Held-out answers (each model's first sample, temperature 1)", ""]
    for i, prompt in enumerate(prompts[:shown]):
        lines.append(f"**{prompt[-1]['content'] if isinstance(prompt, list) else prompt}**")
        lines += [f"- {names[k]}: {json.dumps(run['texts'][i * per_prompt][:160], ensure_ascii=False)}"
                  for k, run in evals.items()]
        lines.append("")
    return lines


def plot(evals: dict, names: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(evals)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    kl = [per_token(evals[k]["log_ratio"], evals[k]["tokens"]) for k in keys]
    reward = [sum(evals[k]["reward"]) / len(evals[k]["reward"]) for k in keys]
    for ax, values, title in ((axes[0], kl, "KL(student ‖ teacher), nats / token"),
                              (axes[1], reward, "teacher's reward (make align's)")):
        ax.bar(range(len(keys)), values, color=["#555", "#b44", "#37a", "#3a7", "#a73"][:len(keys)])
        ax.set_xticks(range(len(keys)), [names[k].split(" (")[0] for k in keys], rotation=20, ha="right")
        ax.set_title(title)
    fig.suptitle("held-out prompts, each model's own samples at temperature 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_sequences(args, teacher, tokenizer, train_prompts: list, count: int = 32) -> list[list[int]]:
    """The teacher's own answers (prompt and answer ids) to the first `count` training prompts, seeded: the text the
    block choice measures the layers on (training prompts only, so the held-out ones stay unseen)."""
    from alignkit.generate.sample import sample_with_counts

    generation = sample_with_counts(teacher, tokenizer, train_prompts[:count], sampling_options(args), 1,
                                    args.seed).extra["generation"]
    return [list(prompt) + list(group[0]) for prompt, group in zip(generation.prompt_ids, generation.ids)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/distill_demo"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/distill_demo.md"))
    parser.add_argument("--eval_prompts", type=int, default=64, help="held-out prompts (the rest train)")
    parser.add_argument("--eval_samples", type=int, default=2, help="answers per held-out prompt and model")
    parser.add_argument("--rounds", type=int, default=16, help="optimizer steps of each method")
    parser.add_argument("--prompts_per_round", type=int, default=8)
    parser.add_argument("--num_samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--drop_block", type=int, default=6,
                        help="drop the block of n consecutive layers that changes its input least on the teacher's own "
                             "answers to the training prompts (alignkit.models.cut.most_similar_block, Gromov et al. "
                             "2024); 0: use --drop_every")
    parser.add_argument("--drop_every", type=int, default=2,
                        help="with --drop_block 0, the student drops layers 1, 1 + n, 1 + 2n, ... (2: every other "
                             "layer; 5: 6 of 30)")
    parser.add_argument("--lora_r", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--gkd_lmbda", type=float, default=0.5)
    parser.add_argument("--gkd_beta", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render_only", action="store_true", help="rewrite --results from OUTPUT/summary.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.render_only:
        return write_results(args, json.loads((args.output_dir / "summary.json").read_text()))
    from alignkit.models.cut import drop_layers, most_similar_block
    from alignkit.models.resolve import load_model_and_tokenizer

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_model_and_tokenizer(args.teacher)
    train_prompts, eval_prompts = split_prompts(args.seed, args.eval_prompts)
    if args.drop_block:
        keep = most_similar_block(teacher, probe_sequences(args, teacher, tokenizer, train_prompts), args.drop_block)
    else:
        keep = [i for i in range(teacher.config.num_hidden_layers) if i % args.drop_every != 1 % args.drop_every]
    cut = drop_layers(copy.deepcopy(teacher), keep)
    student_dir = out / "student_cut"
    cut.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    from alignkit.data.load import write_jsonl_atomic

    train_file = out / "train_prompts.jsonl"
    write_jsonl_atomic(train_file, [{"prompt": p} for p in train_prompts])
    seconds, trained = {}, {}
    for name in args.methods:
        shutil.rmtree(out / name, ignore_errors=True)  # a finished run there would be resumed, not retrained
        tic = time.perf_counter()
        if name == "sft":
            data, step_tokens = teacher_samples(args, teacher, tokenizer, train_prompts, out)
            trained[name] = run_sft(args, student_dir, data, step_tokens, out)
        else:
            trained[name] = run_online_method(args, name, student_dir, train_file, out)
        seconds[name] = time.perf_counter() - tic
    tic = time.perf_counter()
    evals = {name: evaluate(model, teacher, tokenizer, eval_prompts, args)
             for name, model in (("teacher", teacher), ("cut", cut), *trained.items())}
    seconds["evaluation"] = time.perf_counter() - tic
    gain = {name: gains(evals[name], evals["cut"]) for name in trained}
    settings = {"command": "python " + " ".join(sys.argv), "teacher": args.teacher,
                "student": f"layers {', '.join(map(str, keep))} of {teacher.config.num_hidden_layers} "
                           f"({parameter_count(cut) / 1e6:.1f}M of "
                           f"{parameter_count(teacher) / 1e6:.1f}M parameters)",
                "train prompts": len(train_prompts), "held-out prompts": len(eval_prompts),
                "samples per method": args.rounds * args.prompts_per_round * args.num_samples,
                "optimizer steps": args.rounds, "learning rate": f"{args.learning_rate:g} constant",
                "tuning": f"LoRA r {args.lora_r}" if args.lora_r else "full fine-tuning",
                "precision": args.precision, "max_new_tokens": args.max_new_tokens,
                "eval answers per model": len(eval_prompts) * args.eval_samples}
    summary = {"settings": settings, "seconds": seconds, "gains": gain, "evals": evals}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    write_results(args, summary)


if __name__ == "__main__":
    main()
