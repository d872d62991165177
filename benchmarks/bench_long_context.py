"""Long prompts: DPO seconds per pair and peak RSS as the prompt grows, alignkit's modes against TRL (not run in CI).

    python benchmarks/bench_long_context.py                               # 512, 2k, 8k, 16k, 32k; 1 and 4 pairs
    python benchmarks/bench_long_context.py --lengths 512,2048 --pairs 1  # a quicker look

SmolLM2-135M-Instruct, fp32, answers of 60-90 tokens, prompts within ±5 % of each nominal length. Every
(length, pairs per step, contender) runs in its own process on identical weights and token ids, watched by the
parent: a process whose RSS passes --cap-gb (default 22 of the machine's 24 GB) is killed and recorded as not
fitting; a contender that did not fit at some length and batch is not run at longer prompts or larger batches.
One step is timed per run (from the step's start to its end, reference log-probs precomputed before it by every
contender that precomputes); at prompts up to 512 tokens a warm-up step runs first. The loss check (alignkit's
DPO loss = TRL's on the same pair, perturbed policy vs reference) runs at every length where TRL fits one pair.
Writes benchmarks/results/long_context.{md,json,png}."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench_dpo
import dpo_contenders as contenders

MODEL = "smollm2-135m-instruct"
CONTENDERS = ["trl_fastest", "trl_defaults", "alignkit_fp32", "alignkit_fp32_selective", "alignkit_fp32_gc"]
RESULTS = contenders.BENCH_DIR / "results"


def run_one(name: str, length: int, pairs: int, args) -> dict:
    warmup = 1 if length <= 512 else 0
    prompt_range = (round(0.95 * length), round(1.05 * length))
    max_length = prompt_range[1] + 90
    data, lengths, fingerprint = bench_dpo.prepare(MODEL, f"long_{length}_{pairs}", (warmup + 1) * pairs, prompt_range,
                                                   (60, 90), max_length, args.seed)
    spec = {"model": MODEL, "data": str(data), "pairs_per_step": pairs, "warmup": warmup, "steps": 1,
            "max_length": max_length, "lr": 1e-5, "beta": 0.1, "alignkit_options": {}, "repeats": 1,
            "threads": None}
    log_dir = contenders.WORK_DIR / "logs" / f"long_{length}_{pairs}"
    log_dir.mkdir(parents=True, exist_ok=True)
    spec_path = log_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    run = bench_dpo.run_worker(name, spec_path, log_dir, rss_cap_gb=args.cap_gb, time_cap_s=args.time_cap_s)
    row = {"contender": name, "label": bench_dpo.LABELS[name][0], "prompt_length": length, "pairs_per_step": pairs,
           "mean_prompt_tokens": sum(p for p, _, _ in lengths) / len(lengths), "wall_s": run["wall_s"],
           "polled_peak_rss_gb": run["polled_peak_rss_kb"] / 2**20}
    if "error" in run:
        return {**row, "error": run["error"], "over_memory": run.get("over_memory", False)}
    step = run["step_ends"][warmup] - run["step_begins"][warmup]
    return {**row, "seconds_per_pair": step / pairs, "step_seconds": step, "peak_rss_gb": run["peak_rss_kb"] / 2**20,
            "losses": run["losses"], "same_tokens": run["tokens_fingerprint"] == fingerprint}


def loss_check(length: int, args) -> dict:
    prompt_range = (round(0.95 * length), round(1.05 * length))
    max_length = prompt_range[1] + 90
    data, _, _ = bench_dpo.prepare(MODEL, f"long_check_{length}", 1, prompt_range, (60, 90), max_length, args.seed)
    spec = {"model": MODEL, "data": str(data), "pairs_per_step": 1, "max_length": max_length, "beta": 0.1}
    log_dir = contenders.WORK_DIR / "logs" / f"long_check_{length}"
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "spec.json").write_text(json.dumps(spec))
    run = bench_dpo.run_worker("loss_check", log_dir / "spec.json", log_dir, rss_cap_gb=args.cap_gb,
                               time_cap_s=args.time_cap_s)
    return {"prompt_length": length, **({"error": run["error"]} if "error" in run else
                                        {k: run[k] for k in ("max_abs_loss_diff", "max_abs_seq_logp_diff") if k in run})}


def markdown(rows: list[dict], checks: list[dict], args, machine: dict) -> str:
    rows = sorted(rows, key=lambda r: (r["prompt_length"], r["pairs_per_step"]))  # stable: contenders keep order
    checks = sorted(checks, key=lambda c: c["prompt_length"])
    out = ["# Long prompts: DPO on SmolLM2-135M-Instruct, alignkit vs TRL 1.16", "",
           *[f"`{c}`" for c in machine.get("commands", [machine["command"]])], "",
           "fp32, answers 60-90 tokens, prompts within ±5 % of the nominal length; one timed step per run (a warm-up "
           "step first at 512); each run in its own process, killed once its RSS passed "
           f"{args.cap_gb:g} GB (the machine has 24 GB). s/pair = the timed step's seconds / pairs in it.", "",
           "| prompt tokens | pairs/step | contender | s/pair | peak RSS GB | speed vs TRL fastest | RSS ÷ TRL fastest "
           "| speed vs TRL defaults | RSS ÷ TRL defaults |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]

    def anchor(name):
        return {(r["prompt_length"], r["pairs_per_step"]): r for r in rows if r["contender"] == name and "error" not in r}

    anchors = [anchor("trl_fastest"), anchor("trl_defaults")]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['prompt_length']} | {r['pairs_per_step']} | {r['contender']} | – | "
                       f"does not fit: {r['error']} | | | | |" if r.get("over_memory") else
                       f"| {r['prompt_length']} | {r['pairs_per_step']} | {r['contender']} | {r['error']} | | | | | |")
            continue
        cells = []
        for base in anchors:
            trl = base.get((r["prompt_length"], r["pairs_per_step"]))
            cells += [f"**{trl['seconds_per_pair'] / r['seconds_per_pair']:.2f}×**" if trl else "–",
                      f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}" if trl else "–"]
        out.append(f"| {r['prompt_length']} | {r['pairs_per_step']} | {r['contender']} | {r['seconds_per_pair']:.1f} | "
                   f"{r['peak_rss_gb']:.2f} | {' | '.join(cells)} |")
    out += ["", "## Longest prompt trained at 1 pair per step within the cap", "", "| contender | longest prompt |",
            "|---|---:|"]
    for name, longest in longest_trained(rows).items():
        out.append(f"| {name} | {longest or 'none'} |")
    out += ["", "## Loss equality (alignkit's DPO loss vs TRL's on the same pair)", "",
            "| prompt tokens | max abs loss diff | max abs log-prob diff |", "|---:|---:|---:|"]
    for c in checks:
        out.append(f"| {c['prompt_length']} | {c.get('max_abs_loss_diff', c.get('error'))} | "
                   f"{c.get('max_abs_seq_logp_diff', '')} |")
    out += ["", f"Machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}, "
            f"transformers {machine['transformers']}, trl {machine['trl']}; {machine['date']}."]
    return "\n".join(out) + "\n"


def longest_trained(rows: list[dict]) -> dict[str, int | None]:
    longest: dict[str, int | None] = {}
    for r in rows:
        if r["pairs_per_step"] == 1:
            ok = "error" not in r
            longest.setdefault(r["contender"], None)
            if ok and (longest[r["contender"]] or 0) < r["prompt_length"]:
                longest[r["contender"]] = r["prompt_length"]
    return longest


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (r["prompt_length"], r["pairs_per_step"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["contender"] for r in rows):
        for pairs, style in ((1, "-o"), (4, "--s")):
            ok = [r for r in rows if r["contender"] == name and r["pairs_per_step"] == pairs and "error" not in r]
            if ok:
                lengths = [r["prompt_length"] for r in ok]
                axes[0].plot(lengths, [r["seconds_per_pair"] for r in ok], style, label=f"{name}, {pairs} pair(s)")
                axes[1].plot(lengths, [r["peak_rss_gb"] for r in ok], style, label=f"{name}, {pairs} pair(s)")
    for ax, label in ((axes[0], "seconds per pair"), (axes[1], "peak RSS (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
    axes[1].axhline(24, color="grey", linestyle=":", label="machine memory")
    axes[1].legend(fontsize=7)
    fig.suptitle("DPO with long prompts, SmolLM2-135M fp32, 2 CPU cores (missing points: did not fit)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192, 16384,
                                                                                              32768])
    parser.add_argument("--pairs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    parser.add_argument("--four-pairs-up-to", type=int, default=8192, help="the larger batch only up to this length "
                        "(time: a 4-pair step at 16k takes ~30 min on 2 cores)")
    parser.add_argument("--contenders", type=lambda s: s.split(","), default=CONTENDERS)
    parser.add_argument("--cap-gb", type=float, default=22.0)
    parser.add_argument("--time-cap-s", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="long_context")
    parser.add_argument("--report", action="store_true", help="rewrite the Markdown and PNG from the JSON only")
    parser.add_argument("--append", action="store_true", help="add to the results already in --name's JSON (a "
                        "sweep run in parts: e.g. the longest prompts for one contender only)")
    args = parser.parse_args(argv)
    rows, checks, failed = [], [], {}
    stem = RESULTS / args.name
    if args.append and stem.with_suffix(".json").exists():
        saved = json.loads(stem.with_suffix(".json").read_text())
        rows, checks = saved["rows"], saved["loss_checks"]
        for r in rows:
            if r.get("over_memory") and not r.get("skipped"):
                failed.setdefault(r["contender"], []).append((r["prompt_length"], r["pairs_per_step"]))
    if args.report:
        saved = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(markdown(saved["rows"], saved["loss_checks"], args, saved["machine"]))
        chart(saved["rows"], stem.with_suffix(".png"))
        return
    commands = [*saved.get("commands", [saved["machine"]["command"]])] if args.append and rows else []
    for length in args.lengths:
        for pairs in args.pairs:
            if pairs > 1 and length > args.four_pairs_up_to:
                continue
            for name in args.contenders:
                blocked = [(lf, pf) for lf, pf in failed.get(name, []) if lf <= length and pf <= pairs]
                if blocked:
                    rows.append({"contender": name, "label": bench_dpo.LABELS[name][0], "prompt_length": length,
                                 "pairs_per_step": pairs, "error": f"not run: did not fit at {blocked[0][0]} tokens "
                                 f"with {blocked[0][1]} pair(s)", "over_memory": True, "skipped": True})
                    continue
                print(f"prompt {length}, {pairs} pair(s): {name} ...", flush=True)
                row = run_one(name, length, pairs, args)
                rows.append(row)
                print(f"  {row.get('seconds_per_pair', row.get('error'))} s/pair, peak "
                      f"{row.get('peak_rss_gb', row['polled_peak_rss_gb']):.2f} GB", flush=True)
                if "error" in row and row.get("over_memory"):
                    failed.setdefault(name, []).append((length, pairs))
            if pairs == 1 and any(r["contender"].startswith("trl") and "error" not in r and r["prompt_length"] == length
                                  for r in rows):
                print(f"loss check at {length} ...", flush=True)
                checks.append(loss_check(length, args))
            machine = {**bench_dpo.machine_info(), "command": bench_dpo.command_line()}
            machine["commands"] = [*commands, machine["command"]]
            RESULTS.mkdir(exist_ok=True)  # written after every batch: a long sweep keeps what it measured
            stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "loss_checks": checks, "machine": machine,
                                                             "commands": machine["commands"],
                                                             "longest_at_1_pair": longest_trained(rows)}, indent=2))
            stem.with_suffix(".md").write_text(markdown(rows, checks, args, machine))
            chart(rows, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
