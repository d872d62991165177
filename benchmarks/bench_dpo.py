"""DPO side by side: alignkit vs TRL's DPOTrainer on one model, one data set, one batch shape (not run in CI).

    python benchmarks/bench_dpo.py --model llama58m            # headline table, loss check, chart
    python benchmarks/bench_dpo.py --model smollm2
    python benchmarks/bench_dpo.py --model llama58m --prompt-lengths 64,512,2048   # time per pair vs prompt length

Every contender runs in its own subprocess (peak RSS is per contender) on identical weights, token ids, pairs
per step, max length, beta, learning rate and schedule. Results go to benchmarks/results/<model>[_prompt_sweep]
.{md,json,png}. See benchmarks/README.md for what is measured and how tokens are counted."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import dpo_contenders as contenders
from contenders import cpu

RESULTS_DIR = contenders.BENCH_DIR / "results"
MODELS = {"llama58m": None, "smollm2": "smollm2-135m-instruct"}
HEADLINE = ["trl_defaults", "trl_fastest", "alignkit_fp32", "alignkit_bf16", "alignkit_fp32_gc"]
SWEEP = ["trl_fastest", "alignkit_fp32", "alignkit_bf16"]
BASELINE = "trl_fastest"
LABELS = {
    "trl_defaults": ("TRL DPOTrainer, defaults (grad. checkpointing, ref. model each step)", "fp32"),
    "trl_fastest": ("TRL DPOTrainer, fastest (no checkpointing, precomputed ref.)", "fp32"),
    "trl_fastest_bf16": ("TRL DPOTrainer, fastest, bf16=True", "bf16 autocast"),
    "alignkit_fp32": ("alignkit train()", "fp32"),
    "alignkit_bf16": ("alignkit train(), precision: bf16", "bf16 autocast"),
    "alignkit_fp32_gc": ("alignkit train(), gradient_checkpointing: true", "fp32"),
    "alignkit_fp32_selective": ("alignkit train(), selective_recompute: true", "fp32"),
    "alignkit_fp32_no_release": ("alignkit train(), release_memory: false (glibc's default policy)", "fp32"),
    "alignkit_fp32_gc_no_release": ("alignkit train(), gradient_checkpointing: true, release_memory: false", "fp32"),
    "alignkit_fp32_gc_planned4": ("alignkit train(), gradient_checkpointing: true, max_memory_gb: 4", "fp32"),
}


# ----------------------------------------------------------------------------------------------------------------
# Running one contender.


def run_worker(name: str, spec_path: Path, log_dir: Path, rss_cap_gb: float | None = None,
               time_cap_s: float | None = None) -> dict:
    """`name` in a fresh interpreter; returns its result dict plus the parent's own RSS polling (psutil) and the
    load average around it (other processes on the machine make timings noisy). rss_cap_gb: the child is killed
    once its RSS passes it (it does not fit); time_cap_s: killed after that long."""
    import psutil

    result_path = log_dir / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path),
               "--result", str(result_path)]
    load_before = os.getloadavg()[0]
    tic = time.perf_counter()
    reason, over_memory = None, False
    with log_path.open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
        polled_peak = 0
        handle = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                rss = handle.memory_info().rss + sum(c.memory_info().rss for c in handle.children(recursive=True))
                polled_peak = max(polled_peak, rss)
            except psutil.Error:
                pass
            over_memory = rss_cap_gb is not None and polled_peak > rss_cap_gb * 2**30
            if over_memory:
                reason = f"over the {rss_cap_gb:g} GB cap (killed at {polled_peak / 2**30:.1f} GB)"
            elif time_cap_s is not None and time.perf_counter() - tic > time_cap_s:
                reason = f"over the {time_cap_s:g} s cap"
            if reason:
                child.kill()
                child.wait()
                break
            time.sleep(0.1)
    wall = time.perf_counter() - tic
    outcome = {"wall_s": wall, "polled_peak_rss_kb": polled_peak // 1024, "load_before": load_before,
               "load_after": os.getloadavg()[0], "log": str(log_path)}
    if reason:
        print(f"  {name}: {reason}", flush=True)
        return {**outcome, "error": reason, "over_memory": over_memory, "over_time": not over_memory}
    if child.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        print(f"  {name}: FAILED (exit {child.returncode}); log {log_path}\n{tail}", file=sys.stderr)
        return {**outcome, "error": f"exit {child.returncode}", "log_tail": tail}
    return {**outcome, **json.loads(result_path.read_text())}


def worker_main(name: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    result = contenders.run_loss_check(spec) if name == "loss_check" else contenders.CONTENDERS[name](spec)
    Path(result_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------------
# Data and measurements.


def prepare(model_ref: str, tag: str, n_pairs: int, prompt_range, answer_range, max_length: int, seed: int):
    """Write the records once; return their path and (|prompt|, |chosen|, |rejected|) token counts per pair."""
    from alignkit.data import ExampleSettings, prepare_examples

    tokenizer = contenders.load_tokenizer(model_ref)
    records = contenders.make_records(tokenizer, n_pairs, prompt_range, answer_range, seed)
    path = contenders.WORK_DIR / "data" / f"{tag}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = prepare_examples(records, tokenizer, ExampleSettings("pairs", max_length))
    lengths = [(len(e.prompt_ids), len(e.response_ids[0]), len(e.response_ids[1])) for e in examples]
    fingerprint = contenders.tokens_fingerprint((e.prompt_ids, *e.response_ids) for e in examples)
    return path, lengths, fingerprint


def summarise(name: str, run: dict, spec: dict, lengths: list[tuple[int, int, int]]) -> dict:
    """Steady state = from the end of the last warm-up step to the end of the last step."""
    if "error" in run:
        return {"contender": name, **run}
    warmup, pairs = spec["warmup"], spec["pairs_per_step"]
    ends = run["step_ends"]
    step_times = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    timed = lengths[warmup * pairs:(warmup + len(step_times)) * pairs]
    trl_tokens = sum(2 * p + c + r for p, c, r in timed)
    seconds = ends[-1] - ends[warmup - 1]
    cpu_seconds = run["step_cpu"][-1] - run["step_cpu"][warmup - 1]
    return {
        "contender": name, "label": LABELS[name][0], "precision": LABELS[name][1],
        "pairs_per_s": len(timed) / seconds, "tokens_per_s": trl_tokens / seconds,
        "seconds_per_pair": seconds / len(timed), "step_seconds": step_times,
        "cpu_seconds_per_pair": cpu_seconds / len(timed),
        "peak_rss_gb": run["peak_rss_kb"] / 2**20,
        "train_peak_rss_gb": None if run["train_peak_rss_kb"] is None else run["train_peak_rss_kb"] / 2**20,
        "polled_peak_rss_gb": run["polled_peak_rss_kb"] / 2**20,
        "losses": run["losses"], "tokens_fingerprint": run["tokens_fingerprint"], "wall_s": run["wall_s"],
        "load_before": run["load_before"], "load_after": run["load_after"],
        **{k: run[k] for k in ("padding_free_effective", "gradient_checkpointing", "optim") if k in run},
    }


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["contender"] == BASELINE and "error" not in r), None)
    for row in rows:
        if base is not None and "error" not in row:
            row["pairs_per_s_vs_trl_fastest"] = row["pairs_per_s"] / base["pairs_per_s"]
            row["peak_rss_vs_trl_fastest"] = row["peak_rss_gb"] / base["peak_rss_gb"]
            if row["train_peak_rss_gb"] and base["train_peak_rss_gb"]:
                row["train_peak_rss_vs_trl_fastest"] = row["train_peak_rss_gb"] / base["train_peak_rss_gb"]


def machine_info() -> dict:
    import torch
    import transformers
    import trl

    return {"cpu": cpu()[0], "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


# ----------------------------------------------------------------------------------------------------------------
# Reports.


def fmt(value, spec=".2f", missing="–"):
    return missing if value is None else format(value, spec)


def headline_markdown(model: str, rows, check, spec, machine, lengths) -> str:
    n_pairs = len(lengths)
    mean = [sum(x[i] for x in lengths) / n_pairs for i in range(3)]
    out = [f"# DPO benchmark: {model}", "",
           f"Batch {spec['pairs_per_step']} pairs/step, {spec['warmup']} warm-up + {spec['steps']} timed steps, "
           f"max length {spec['max_length']}, beta {spec['beta']}, lr {spec['lr']} (linear), AdamW, grad clip 1.0. "
           f"Data: {n_pairs} synthetic pairs, mean |prompt| {mean[0]:.0f}, |chosen| {mean[1]:.0f}, "
           f"|rejected| {mean[2]:.0f} tokens. Tokens/s counts 2·|prompt| + |chosen| + |rejected| per pair for every "
           "contender (the tokens TRL runs through the model; padding not counted). "
           f"Each contender ran {spec['repeats']} time(s), round-robin, in its own process; the fastest run is shown. "
           f"alignkit options beyond the shared ones: {spec['alignkit_options'] or 'none (its defaults)'}.", "",
           "| contender | precision | pairs/s | tokens/s | s/step median (min–max) | CPU s/pair "
           "| peak RSS GB (process) | peak RSS GB (training) | pairs/s ÷ TRL fastest "
           "| RSS ÷ TRL fastest (process / training) | loss steps 1–3 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['contender']} | | failed: {r['error']} (see {r['log']}) | | | | | | | | |")
            continue
        steps = r["step_seconds"]
        losses = ", ".join(f"{x:.6f}" for x in r["losses"][:3])
        rss_ratio = f"{fmt(r.get('peak_rss_vs_trl_fastest'))} / {fmt(r.get('train_peak_rss_vs_trl_fastest'))}"
        runs = "" if len(r.get("runs_pairs_per_s", [])) < 2 else \
            f" (runs: {', '.join(f'{x:.3f}' for x in r['runs_pairs_per_s'])})"
        out.append(f"| {r['contender']}: {r['label']} | {r['precision']} | {r['pairs_per_s']:.3f}{runs} | "
                   f"{r['tokens_per_s']:.0f} | {statistics.median(steps):.2f} ({min(steps):.2f}–{max(steps):.2f}) | "
                   f"{r['cpu_seconds_per_pair']:.2f} | {r['peak_rss_gb']:.2f} | {fmt(r['train_peak_rss_gb'])} | "
                   f"**{fmt(r.get('pairs_per_s_vs_trl_fastest'))}×** | {rss_ratio} | {losses} |")
    out += ["", "Targets (issue): pairs/s ≥ 3× TRL fastest and peak RSS ≤ 0.5× TRL fastest, fp32 vs fp32."]
    fp32 = next((r for r in rows if r["contender"] == "alignkit_fp32" and "error" not in r), None)
    if fp32 and "pairs_per_s_vs_trl_fastest" in fp32:
        speed_ok = fp32["pairs_per_s_vs_trl_fastest"] >= 3
        mem_ok = fp32["peak_rss_vs_trl_fastest"] <= 0.5
        out.append(f"alignkit fp32: speed {fp32['pairs_per_s_vs_trl_fastest']:.2f}× ({'met' if speed_ok else 'missed'}), "
                   f"peak RSS {fp32['peak_rss_vs_trl_fastest']:.2f}× ({'met' if mem_ok else 'missed'}).")
    out += ["", "## Loss equality", ""]
    if check is None:
        out.append("Not run (--skip-check).")
    elif "error" in check:
        out.append(f"Check failed to run: {check['error']} (see {check['log']}).")
    else:
        out += [f"Reference = the shared initial model; policy = the same weights + {check['perturb_scale']}·std(w)·N(0,1) "
                f"(fixed seed). DPO loss of each of the {check['batches']} batches of {spec['pairs_per_step']} pairs, "
                "alignkit (packed, prefix-shared) vs TRL `DPOTrainer.compute_loss`, fp32, no grad:", "",
                f"- max |loss difference| = **{check['max_abs_loss_diff']:.2e}** "
                f"({'within' if check['max_abs_loss_diff'] <= 1e-4 else 'OUTSIDE'} 1e-4)",
                f"- max |sequence log-prob difference| = {check['max_abs_seq_logp_diff']:.2e}",
                f"- losses alignkit: {', '.join(f'{x:.6f}' for x in check['alignkit_losses'])}",
                f"- losses TRL:      {', '.join(f'{x:.6f}' for x in check['trl_losses'])}"]
    fingerprints = {r["tokens_fingerprint"] for r in rows if "error" not in r}
    out += ["", f"Token ids: every contender trained on the same ids: {'yes' if len(fingerprints) == 1 else 'NO'} "
            f"(fingerprint {', '.join(sorted(fingerprints))}). Training-step losses 1–3 above come from the same "
            "batches in the same order; step 1 is log 2 for all (reference = policy).", ""]
    out += machine_markdown(machine, rows)
    return "\n".join(out) + "\n"


def machine_markdown(machine: dict, rows) -> list[str]:
    loads = ", ".join(f"{r['contender']} {r['load_before']:.1f}→{r['load_after']:.1f}" for r in rows if "load_before" in r)
    return ["## Machine and command", "",
            f"- CPU: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}",
            f"- python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
            f"trl {machine['trl']}; {machine['date']}",
            f"- 1-min load average before→after each contender: {loads}. The machine is shared; a load above "
            "the core count means other processes took CPU time and the timings are noisy.",
            f"- command: `{machine['command']}`", ""]


def bar_chart(rows, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    names = [r["contender"] for r in ok]
    colors = ["#999999" if n.startswith("trl") else "#1f77b4" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "pairs_per_s", "pairs / s (higher is better)"),
                           (axes[1], "peak_rss_gb", "peak RSS, GB (lower is better)")):
        values = [r[key] for r in ok]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.2f")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The two modes.


def base_spec(args, model_ref: str, data: Path) -> dict:
    alignkit_options = {} if args.alignkit_row_tokens is None else {"max_tokens_per_row": args.alignkit_row_tokens}
    return {"model": model_ref, "data": str(data), "pairs_per_step": args.pairs_per_step, "warmup": args.warmup,
            "steps": args.steps, "max_length": args.max_length, "lr": args.lr, "beta": args.beta,
            "alignkit_options": alignkit_options, "repeats": args.repeats, "threads": args.threads}


def run_contenders(names, repeats: int, spec, spec_path, log_dir, lengths, prefix: str) -> list[dict]:
    """Each contender `repeats` times, round-robin (A B C A B C: a burst of load from other processes does not
    land on one contender only); the row kept is the contender's fastest run, with every run's pairs/s."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            print(f"{prefix}{name} (run {repeat + 1}/{repeats}) ...", flush=True)
            row = summarise(name, run_worker(name, spec_path, log_dir), spec, lengths)
            runs[name].append(row)
            if "error" not in row:
                print(f"  {row['pairs_per_s']:.3f} pairs/s ({row['seconds_per_pair']:.2f} s/pair), "
                      f"{row['tokens_per_s']:.0f} tok/s, peak {row['peak_rss_gb']:.2f} GB, losses {row['losses'][:3]}",
                      flush=True)
    rows = []
    for name in names:
        ok = [r for r in runs[name] if "error" not in r]
        if not ok:
            rows.append(runs[name][-1])
            continue
        best = max(ok, key=lambda r: r["pairs_per_s"])
        rows.append({**best, "runs_pairs_per_s": [r["pairs_per_s"] for r in ok],
                     "runs_peak_rss_gb": [r["peak_rss_gb"] for r in ok]})
    return rows


def headline(args, model_ref: str) -> None:
    prompt_range, answer_range = tuple(args.prompt_tokens), tuple(args.answer_tokens)
    n_pairs = (args.warmup + args.steps) * args.pairs_per_step
    data, lengths, fingerprint = prepare(model_ref, f"{args.model}_headline", n_pairs, prompt_range, answer_range,
                                         args.max_length, args.seed)
    spec = base_spec(args, model_ref, data)
    log_dir = contenders.WORK_DIR / "logs" / args.model
    log_dir.mkdir(parents=True, exist_ok=True)
    spec_path = log_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    check = None
    if not args.skip_check:
        print("loss check ...", flush=True)
        check = run_worker("loss_check", spec_path, log_dir)
        if "error" not in check:
            print(f"  max |loss diff| {check['max_abs_loss_diff']:.2e}", flush=True)
    rows = run_contenders(args.contenders, args.repeats, spec, spec_path, log_dir, lengths, "")
    add_ratios(rows)
    for r in rows:
        if "error" not in r and r["tokens_fingerprint"] != fingerprint:
            print(f"WARNING: {r['contender']} tokenised the data differently", file=sys.stderr)
    machine = {**machine_info(), "command": command_line()}
    machine["torch_threads"] = args.threads or machine["torch_threads"]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / ((args.name or args.model) + (f"_threads{args.threads}" if args.threads else ""))
    stem.with_suffix(".json").write_text(json.dumps(
        {"model": args.model, "spec": spec, "lengths": lengths, "loss_check": check, "rows": rows, "machine": machine},
        indent=2))
    stem.with_suffix(".md").write_text(headline_markdown(args.model, rows, check, spec, machine, lengths))
    bar_chart(rows, f"DPO on {args.model}: batch {args.pairs_per_step} pairs, max length {args.max_length}, "
              f"{machine['cores']} CPU cores", stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


def sweep(args, model_ref: str) -> None:
    """Seconds per pair as the prompt grows (answers unchanged): the prefix-shared packing's saving grows with
    the prompt's share of the tokens."""
    rows, specs = [], {}
    for length in args.prompt_lengths:
        steps = args.sweep_steps if length <= 512 else max(1, args.sweep_steps - 1)
        prompt_range = (round(0.9 * length), round(1.1 * length))
        max_length = prompt_range[1] + args.answer_tokens[1]
        n_pairs = (args.sweep_warmup + steps) * args.sweep_pairs
        data, lengths, _ = prepare(model_ref, f"{args.model}_sweep_{length}", n_pairs, prompt_range,
                                   tuple(args.answer_tokens), max_length, args.seed)
        spec = {**base_spec(args, model_ref, data), "pairs_per_step": args.sweep_pairs, "warmup": args.sweep_warmup,
                "steps": steps, "max_length": max_length}
        specs[length] = spec
        log_dir = contenders.WORK_DIR / "logs" / f"{args.model}_sweep_{length}"
        log_dir.mkdir(parents=True, exist_ok=True)
        spec_path = log_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        group = run_contenders(args.contenders, args.repeats, spec, spec_path, log_dir, lengths, f"prompt {length}: ")
        for row in group:
            row["prompt_length"] = length
        add_ratios(group)
        rows += group
    machine = {**machine_info(), "command": command_line()}
    machine["torch_threads"] = args.threads or machine["torch_threads"]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / (f"{args.model}_prompt_sweep" + (f"_threads{args.threads}" if args.threads else ""))
    stem.with_suffix(".json").write_text(json.dumps({"model": args.model, "specs": specs, "rows": rows,
                                                     "machine": machine}, indent=2))
    out = [f"# DPO time per pair vs prompt length: {args.model}", "",
           f"{args.sweep_pairs} pairs/step, {args.sweep_warmup} warm-up step(s), then {args.sweep_steps} timed steps "
           f"(one fewer above 512 tokens); prompts uniform in [0.9, 1.1]× the nominal length, answers "
           f"{args.answer_tokens[0]}–{args.answer_tokens[1]} tokens; max length = longest prompt + longest answer.", "",
           "| prompt tokens | contender | precision | s/pair | pairs/s | peak RSS GB | speed-up vs TRL fastest "
           "| RSS ÷ TRL fastest |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['prompt_length']} | {r['contender']} | | failed: {r['error']} | | | | |")
            continue
        out.append(f"| {r['prompt_length']} | {r['contender']} | {r['precision']} | {r['seconds_per_pair']:.2f} | "
                   f"{r['pairs_per_s']:.3f} | {r['peak_rss_gb']:.2f} | **{fmt(r.get('pairs_per_s_vs_trl_fastest'))}×** | "
                   f"{fmt(r.get('peak_rss_vs_trl_fastest'))} |")
    out += [""] + machine_markdown(machine, rows)
    stem.with_suffix(".md").write_text("\n".join(out) + "\n")
    sweep_chart(rows, args.model, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


def sweep_chart(rows, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["contender"] for r in rows):
        points = [(r["prompt_length"], r["seconds_per_pair"]) for r in rows if r["contender"] == name and "error" not in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("seconds per pair (lower is better)")
    ax.set_title(f"DPO step time per pair vs prompt length: {model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama58m")
    parser.add_argument("--contenders", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated, from {', '.join(contenders.CONTENDERS)}")
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed (the first is never timed)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(96, 144), metavar=("MIN", "MAX"))
    parser.add_argument("--answer-tokens", type=int, nargs=2, default=(40, 80), metavar=("MIN", "MAX"))
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--skip-check", action="store_true", help="skip the loss-equality check")
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender (round-robin); the fastest is kept")
    parser.add_argument("--name", default=None, help="results file stem (default: the model's name)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per contender (default: torch's, one per core); 1 is robust on a busy machine")
    parser.add_argument("--alignkit-row-tokens", type=int, default=None,
                        help="alignkit's max_tokens_per_row (default: alignkit's own default)")
    parser.add_argument("--prompt-lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="sweep mode: nominal prompt lengths, e.g. 64,512,2048")
    parser.add_argument("--sweep-pairs", type=int, default=2)
    parser.add_argument("--sweep-warmup", type=int, default=1)
    parser.add_argument("--sweep-steps", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.contenders is None:
        args.contenders = SWEEP if args.prompt_lengths else HEADLINE
    unknown = [c for c in args.contenders if c not in contenders.CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; known: {', '.join(contenders.CONTENDERS)}")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step's start is not observable)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec, args.result)
        return
    model_ref = MODELS[args.model] or str(contenders.ensure_llama58m())
    (sweep if args.prompt_lengths else headline)(args, model_ref)


if __name__ == "__main__":
    main()
