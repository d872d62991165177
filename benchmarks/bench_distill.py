"""On-policy distillation: TRL 1.16's DistillationTrainer (and the experimental GKDTrainer) against
`alignkit distill --lmbda 1` (loss gkd, and opd), on the same teacher, student, prompts and settings.

    python benchmarks/bench_distill.py   # SmolLM2-135M-Instruct -> its 15-layer cut; 4 prompts x 4 samples, 64 tokens

Setup, the same for every contender (each in its own process, 1 warm-up step then --steps timed):
- teacher: SmolLM2-135M-Instruct through alignkit's resolver; student: the teacher with every other decoder layer
  dropped (alignkit.models.cut.drop_layers: layers 0, 2, ..., 28 of 30, initialised from the teacher's weights),
  made once into benchmarks/work/distill/<teacher>-even-layers;
- prompts: the first prompts of src/alignkit/assets/align_prompts.jsonl (a user turn each, SmolLM2's chat template),
  --prompts per step x --k samples each (TRL samples one completion per dataset row, so each prompt is given k times
  in a row and the dataset is not shuffled);
- the student samples every batch (GKD's lambda = 1), --max-new-tokens at --temperature, top-k/top-p off; the loss
  is the generalized JSD with --beta (1: the reverse KL, DistillationConfig's default) at the same temperature,
  token-mean;
- full fine-tuning (no LoRA), fp32, AdamW, lr 1e-6 constant, gradient clipping 1.0, no gradient checkpointing.
  TRL samples with transformers generate (no vLLM on CPU), alignkit with its fast engine.

Contenders: trl_distill (DistillationTrainer: chunked divergence over the vocabulary), trl_gkd (GKDTrainer,
lmbda 1, seq_kd off: both models' full [batch x length x vocab] logits; its loss ignores `temperature`, which only
reaches sampling, so it matches the others at temperature 1 only), alignkit_gkd (`alignkit distill --loss gkd
--lmbda 1`), alignkit_opd (`--loss opd`: the teacher scores only the sampled tokens, a policy-gradient step on the
per-token reverse KL; the same objective in expectation, not the same loss).

Reported: samples/s (a step's sampled completions / its wall time: sampling, teacher, loss, backward, optimizer),
process CPU seconds per sample (steadier on a shared machine), sampled tokens per completion, peak RSS (VmHWM of
the contender's own process), each as a ratio to trl_distill, and the divergence at the warm-up step (before any
update; at beta 1 every contender's is the per-token reverse KL, in expectation over its own samples). Writes
benchmarks/results/distill.{json,md}. Not run in CI (needs trl: `.[bench]`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from contenders import machine, print_result, run_in_own_process

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "distill"
PROMPTS = Path(__file__).parents[1] / "src" / "alignkit" / "assets" / "align_prompts.jsonl"
CONTENDERS = ("trl_distill", "trl_gkd", "alignkit_gkd", "alignkit_opd", "alignkit_opd_lean", "trl_distill_bf16",
              "alignkit_opd_bf16", "alignkit_opd_bf16_m", "alignkit_opd_bf16_m1024", "alignkit_opd_bf16_m_keep",
              "alignkit_opd_bf16_m_full", "alignkit_opd_bf16_m_fast")
# the same step with less held at once: RMSNorm/SwiGLU recomputed, 512-token micro-batches, freed blocks returned
LEAN = {"selective_recompute": True, "max_tokens_per_batch": 512, "release_memory": True}
# alignkit contender -> (loss, config keys beyond the shared settings)
ALIGNKIT = {"alignkit_gkd": ("gkd", {}), "alignkit_opd": ("opd", {}), "alignkit_opd_lean": ("opd", LEAN),
            "alignkit_opd_bf16": ("opd", {**LEAN, "precision": "bf16", "engine_precision": "bf16"})}
# _m: and AdamW's moments in bf16; _m1024: and 1024-token micro-batches (fewer passes, more held at once)
ALIGNKIT["alignkit_opd_bf16_m"] = ("opd", {**ALIGNKIT["alignkit_opd_bf16"][1], "adam_moments": "bf16"})
ALIGNKIT["alignkit_opd_bf16_m1024"] = ("opd", {**ALIGNKIT["alignkit_opd_bf16_m"][1], "max_tokens_per_batch": 1024})
# _m_keep: _m with glibc's heap kept (release_memory false); _m_full: _m with every activation kept (no selective
# recomputation): what the bf16 moments' savings could buy back in speed
ALIGNKIT["alignkit_opd_bf16_m_keep"] = ("opd", {**ALIGNKIT["alignkit_opd_bf16_m"][1], "release_memory": False})
ALIGNKIT["alignkit_opd_bf16_m_full"] = ("opd", {**ALIGNKIT["alignkit_opd_bf16_m"][1], "selective_recompute": False})
# _m_fast: both (bf16, bf16 moments, 512-token micro-batches, nothing recomputed, the heap kept)
ALIGNKIT["alignkit_opd_bf16_m_fast"] = ("opd", {**ALIGNKIT["alignkit_opd_bf16_m_full"][1], "release_memory": False})
BASELINE = "trl_distill"


def student(args) -> tuple[Path, Path]:
    """(teacher dir, student dir): the student is the teacher's even decoder layers, saved once in fp32."""
    import torch

    from alignkit.models.cut import drop_layers
    from alignkit.models.resolve import load_model_and_tokenizer, resolve_model

    teacher_dir = Path(resolve_model(args.model))
    student_dir = WORK / f"{Path(args.model).name}-even-layers"
    if not (student_dir / "config.json").exists():
        model, tokenizer = load_model_and_tokenizer(str(teacher_dir), dtype=torch.float32)
        drop_layers(model, range(0, model.config.num_hidden_layers, 2))
        model.save_pretrained(student_dir)
        tokenizer.save_pretrained(student_dir)
    return teacher_dir, student_dir


def prompts(n: int) -> list[dict]:
    """The first n prompt records (chat messages) of the shipped prompts."""
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    if n > len(rows):
        raise SystemExit(f"--prompts x (--steps + 1) = {n} prompts needed; {PROMPTS.name} has {len(rows)}")
    return rows[:n]


def peak_rss_gb() -> float:
    """This process's peak RSS: VmHWM of its own address space (not the parent's pages, as ru_maxrss may count)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _models(args, teacher_dir: Path, student_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return load(student_dir), load(teacher_dir), tokenizer


def _trl_common(args, bf16: bool = False) -> dict:
    return {"output_dir": tempfile.mkdtemp(), "per_device_train_batch_size": args.prompts * args.k,
            "temperature": args.temperature, "beta": args.beta, "learning_rate": args.lr,
            "lr_scheduler_type": "constant", "max_grad_norm": 1.0, "max_steps": args.steps + 1, "logging_steps": 1,
            "report_to": "none", "use_cpu": True, "bf16": bf16, "gradient_checkpointing": False,
            "save_strategy": "no", "seed": 0, "dataloader_num_workers": 0}


def _clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.cpu: list[float] = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return Clock()


def _timed(args, marks: list[float], cpu: list[float]) -> dict:
    """Wall and process CPU seconds of the steps after the warm-up, from the marks at the start and each step's end."""
    step_s = [b - a for a, b in zip(marks, marks[1:])][1:]
    samples = args.prompts * args.k * len(step_s)
    return {"s_per_step": sum(step_s) / len(step_s), "samples_per_s": samples / sum(step_s),
            "cpu_s_per_sample": (cpu[-1] - cpu[1]) / samples, "peak_rss_gb": peak_rss_gb()}


def _trl_result(args, clock, logs: list[dict], tokens: list[float]) -> dict:
    return {**_timed(args, clock.marks, clock.cpu),
            "sampled_tokens": sum(tokens[1:]) / len(tokens[1:]),
            "warmup_divergence": logs[0]["loss"], "losses": [e["loss"] for e in logs]}


def run_trl_distill(args, teacher_dir: Path, student_dir: Path, bf16: bool = False) -> dict:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    model, teacher, tokenizer = _models(args, teacher_dir, student_dir)
    rows = [{"prompt": r["prompt"]} for r in prompts(args.prompts * (args.steps + 1)) for _ in range(args.k)]
    config = DistillationConfig(**_trl_common(args, bf16), max_completion_length=args.max_new_tokens, top_k=0, top_p=1.0,
                                shuffle_dataset=False)
    clock = _clock()
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=config,
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return _trl_result(args, clock, logs, [e["completions/mean_length"] for e in logs])


def run_trl_gkd(args, teacher_dir: Path, student_dir: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    model, teacher, tokenizer = _models(args, teacher_dir, student_dir)
    # GKD reads chats whose last turn is the dataset's answer; with lmbda 1 the student's samples replace it.
    rows = [{"messages": [*r["prompt"], {"role": "assistant", "content": "OK."}]}
            for r in prompts(args.prompts * (args.steps + 1)) for _ in range(args.k)]
    config = GKDConfig(**_trl_common(args), max_new_tokens=args.max_new_tokens, lmbda=1.0, seq_kd=False)
    tokens: list[float] = []
    rescale: list[float] = []
    generate = GKDTrainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):  # the sampled tokens per completion, as DistillationTrainer logs
        ids, mask, labels = generate(model, inputs, generation_config)
        sampled = float((labels[:, 1:] != -100).sum())
        tokens.append(sampled / len(labels))
        # transformers divides GKD's summed loss by num_items_in_batch, counted on the dataset's answers ("OK.")
        # before the samples replace them: this factor makes it the per-sampled-token mean the others log.
        rescale.append(float((inputs["labels"][:, 1:] != -100).sum()) / sampled)
        return ids, mask, labels

    GKDTrainer.generate_on_policy_outputs = staticmethod(counted)
    clock = _clock()
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[clock])
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(rows)  # a batch = k copies of each prompt
    trainer.train()
    logs = [{**e, "logged_loss": e["loss"], "loss": e["loss"] * factor}
            for e, factor in zip([e for e in trainer.state.log_history if "loss" in e], rescale)]
    return _trl_result(args, clock, logs, tokens)


def run_alignkit(args, teacher_dir: Path, student_dir: Path, loss: str, extra: dict) -> dict:
    import torch

    from alignkit.online.run import OnlineRun
    from alignkit.recipes.distill import run_distill

    torch.set_num_threads(args.threads)
    marks: list[float] = []  # the first round's start, then every round's end (as TRL's on_step_end)
    cpu: list[float] = []
    one_round = OnlineRun.round

    def timed_round(run, round_index):
        if not marks:
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
        out = one_round(run, round_index)
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        return out

    OnlineRun.round = timed_round
    work = Path(tempfile.mkdtemp())
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompts(args.prompts * (args.steps + 1))))
    options = {"beta": args.beta, "temperature": args.temperature} if loss == "gkd" else {}
    result = run_distill({
        "model": str(student_dir), "teacher": str(teacher_dir), "loss": loss, "lmbda": 1.0, "prompts": str(data),
        "output_dir": str(work / "run"), "rounds": args.steps + 1, "prompts_per_round": args.prompts,
        "num_samples": args.k, "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature},
        "learning_rate": args.lr, "lr_schedule": "constant", "max_grad_norm": 1.0, "precision": "fp32",
        "eval_before_after": False, "progress": False, "report_to": ["jsonl"], "seed": 0, **options, **extra})
    timed = result.rounds[1:]
    step_s = [b - a for a, b in zip(marks, marks[1:])][1:]  # without the warm-up round
    divergence = next(key for key in result.rounds[0] if key.endswith(("distill/divergence", "distill/reverse_kl")))
    return {**_timed(args, marks, cpu),
            "sampled_tokens": sum(r["generated_tokens"] for r in timed) / (args.prompts * args.k * len(timed)),
            "warmup_divergence": result.rounds[0][divergence], "losses": [r[divergence] for r in result.rounds],
            "divergence_metric": divergence,
            "time_split": {part: sum(r[f"time/{part}_s"] for r in timed) / sum(step_s)
                           for part in ("generate", "reward", "score", "learner")}}


def run_one(name: str, args, teacher_dir: Path, student_dir: Path) -> dict:
    if name.startswith("trl_distill"):
        return run_trl_distill(args, teacher_dir, student_dir, bf16=name.endswith("bf16"))
    if name == "trl_gkd":
        return run_trl_gkd(args, teacher_dir, student_dir)
    return run_alignkit(args, teacher_dir, student_dir, *ALIGNKIT[name])


def markdown(rows: dict, header: dict) -> str:
    base = rows.get(BASELINE) or next(iter(rows.values()))
    lines = [f"# On-policy distillation: alignkit against TRL {header['trl']} ({header['teacher']} -> its "
             f"{header['student_layers']}-layer cut)", "",
             f"{header['machine']}; torch {header['torch']}, {header['threads']} threads; {header['prompts']} prompts "
             f"x {header['k']} samples per step, {header['max_new_tokens']} new tokens at most, temperature "
             f"{header['temperature']}, beta {header['beta']}, lr {header['lr']} constant, fp32 (the _bf16 contenders: bf16 "
             f"autocast, TRL's bf16=True; alignkit's engine and teacher weights in bf16 too), full fine-tuning, "
             f"no gradient checkpointing, no vLLM (TRL samples with transformers generate, alignkit with its fast "
             f"engine); 1 warm-up step, {header['steps']} timed, each contender in its own process, one run. "
             f"Student: {header['student']}. Command: `{header['command']}`", "",
             f"| contender | s/step | samples/s | vs {BASELINE} | CPU s/sample | vs {BASELINE} | peak RSS | "
             f"vs {BASELINE} | sampled tokens | divergence at warm-up |", "|---|" + "---:|" * 9]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['s_per_step']:.2f} | {r['samples_per_s']:.3f} | "
                     f"{r['samples_per_s'] / base['samples_per_s']:.2f}x | {r['cpu_s_per_sample']:.2f} | "
                     f"{r['cpu_s_per_sample'] / base['cpu_s_per_sample']:.2f}x | {r['peak_rss_gb']:.2f} GB | "
                     f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x | {r['sampled_tokens']:.1f} | "
                     f"{r['warmup_divergence']:.4f} |")
    lines += ["", "samples/s: a timed step's completions / its wall time (sampling, teacher, loss, backward, "
              "optimizer); CPU s/sample: the process's CPU time (all threads) over the timed steps per completion, "
              "steadier than wall time on a shared machine; peak RSS: VmHWM of the contender's process (imports, both "
              "models, optimizer state, every step); sampled tokens: per completion, mean of the timed steps; "
              "divergence: the loss of the warm-up step before any update (trl_distill: the logged loss; trl_gkd: "
              "the logged loss rescaled to a per-sampled-token mean, since transformers divides it by the count of "
              "the dataset's answer tokens, which the samples replace; alignkit_gkd: distill/divergence; "
              "alignkit_opd: distill/reverse_kl, the k1 estimate on the sampled tokens). _lean: "
              "selective_recompute, max_tokens_per_batch 512, release_memory (the same step, less held at once); _m: "
              "and adam_moments bf16 (AdamW's two moments held in bf16); _m1024: and 1024-token micro-batches. "
              "Target (issue 31): "
              f">= 3x {BASELINE}'s samples/s at <= 0.5x its peak RSS.", ""]
    for name, r in rows.items():
        if "time_split" in r:
            split = ", ".join(f"{part} {100 * share:.0f}%" for part, share in r["time_split"].items())
            lines.append(f"- {name}'s timed steps: {split} (alignkit's per-round timers; score: the teacher's "
                         f"log-probs and the experience)")
    for ours, theirs in ((name, "trl_distill_bf16") for name in rows if name.startswith("alignkit_opd_bf16")):
        if ours in rows and theirs in rows:
            a, b = rows[ours], rows[theirs]
            lines.append(f"- like for like in bf16: {ours} {a['samples_per_s'] / b['samples_per_s']:.2f}x {theirs}'s "
                         f"samples/s at {a['peak_rss_gb'] / b['peak_rss_gb']:.2f}x its peak RSS")
    loads = ", ".join(f"{name} {load:.1f}" for name, load in header["load_1min_before"].items())
    lines.append(f"- 1-minute load average before each contender: {loads} ({header['machine']})")
    return "\n".join(lines) + "\n"


def setup(args, teacher_dir: Path, student_dir: Path, loads: dict, seconds: float) -> dict:
    """The run's settings and machine, for the report."""
    import torch
    import trl
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(student_dir).num_hidden_layers
    teacher_layers = AutoConfig.from_pretrained(teacher_dir).num_hidden_layers
    return {"teacher": args.model, "student_layers": layers,
            "machine": machine(),
            "torch": torch.__version__, "trl": trl.__version__, "threads": args.threads, "prompts": args.prompts,
            "k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "beta": args.beta,
            "lr": args.lr, "steps": args.steps, "runs": 1,
            "student": f"the teacher's decoder layers 0, 2, ..., {2 * layers - 2} ({layers} of {teacher_layers}), "
                       f"benchmarks/work/distill/{student_dir.name}",
            "contenders_seconds": seconds, "load_1min_before": loads,
            "command": "python benchmarks/bench_distill.py " + " ".join(sys.argv[1:])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the teacher")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt (>= 2: alignkit's num_samples)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after 1 warm-up step)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", default="distill", help="results/<out>.md and .json")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    teacher_dir, student_dir = student(args)
    if args.one:
        print_result(run_one(args.one, args, teacher_dir, student_dir))
        return
    tic = time.perf_counter()
    rows, loads = {}, {}
    for name in args.contenders.split(","):
        loads[name] = os.getloadavg()[0]
        rows[name] = run_in_own_process(__file__, name, args)
        print(name, rows[name], flush=True)
    header = setup(args, teacher_dir, student_dir, loads, time.perf_counter() - tic)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"setup": header, "contenders": rows}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
