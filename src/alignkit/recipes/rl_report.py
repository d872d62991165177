"""`alignkit rl`'s report: the tables in the terminal, report.html with its curves, per-type chart, flag tables and
examples, summary.json and the answers as JSONL; the figures come computed (recipes/rl.py)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from alignkit.data.load import write_jsonl_atomic
from alignkit.eval.plots import plot_curves
from alignkit.eval.report import rich_table, write_html_report
from alignkit.recipes.stages import percent_ci, points_ci
from alignkit.rewards.verifiable.degenerate import prompt_text


def _result_rows(s: dict) -> list[list[str]]:
    return [
        ["metric (held-out combinations)", "original", "trained", "change (95% CI)"],
        ["all constraints met", percent_ci(s["all_met_before"]), percent_ci(s["all_met_after"]), points_ci(s["all_met_change"])],
        ["fraction of constraints met", percent_ci(s["fraction_before"]), percent_ci(s["fraction_after"]),
         points_ci(s["fraction_change"])],
        ["mean words per answer", f"{s['words_before']:.1f}", f"{s['words_after']:.1f}", ""],
        ["distinct-2", f"{s['distinct2_before']:.3f}", f"{s['distinct2_after']:.3f}",
         f"{s['distinct2_after'] / max(s['distinct2_before'], 1e-9) - 1:+.1%}"],
        ["KL to the start (nats / answer)", "", f"{s['kl_to_start']:.2f} ± {s['kl_to_start_sem']:.2f}", ""],
        ["answers with a degeneracy flag", f"{s['flagged']['any'][0]:.1%}", f"{s['flagged']['any'][1]:.1%}",
         points_ci(s["flagged_any_change"])],
        ["fluency: NLL under the start (nats / token)", f"{s['fluency_nll_before']:.3f}",
         f"{s['fluency_nll_after']:.3f}", f"{s['fluency_nll_after'] / s['fluency_nll_before'] - 1:+.1%}"],
    ]


def phrasing_rows(p: dict) -> list[list[str]]:
    ceiling = [["ceiling: all met if every trained type were", percent_ci(p["ceiling_before"]),
                percent_ci(p["ceiling_after"]), points_ci(p["ceiling_change"])]] if "ceiling_before" in p else []
    return [["metric (held-out phrasings)", "original", "trained", "change (95% CI)"],
            ["all constraints met", percent_ci(p["all_met_before"]), percent_ci(p["all_met_after"]), points_ci(p["all_met_change"])],
            ["fraction of constraints met", percent_ci(p["fraction_before"]), percent_ci(p["fraction_after"]),
             points_ci(p["fraction_change"])],
            ["answers with a degeneracy flag", f"{p['flagged']['any'][0]:.1%}", f"{p['flagged']['any'][1]:.1%}",
             points_ci(p["flagged_any_change"])]] + ceiling


def phrasing_tables(p: dict, answers: tuple) -> dict[str, list[list[str]]]:
    """The held-out-phrasings tables: results, per type, per flag, and the first answers of each model."""
    records, before, after = answers[:3]
    return {"Held-out phrasings": phrasing_rows(p),
            "Per constraint type (held-out phrasings)": [["constraint type", "original", "trained"]] + [
                [k, f"{b:.1%}", f"{a:.1%}"] for k, (b, a) in sorted(p["by_type"].items())],
            "Degeneracy flags (held-out phrasings)": [["degeneracy flag", "original", "trained"]] + [
                [k, f"{b:.1%}", f"{a:.1%}"] for k, (b, a) in p["flagged"].items()],
            "Examples (held-out phrasings)": [["prompt", "original", "trained"]] + [
                [r["prompt"][-1]["content"], b[0], a[0]] for r, b, a in list(zip(records, before, after))[:6]]}


def write_answers(path: Path, answers: tuple) -> None:
    """answers (records, the original's answers, the trained model's, their flags) as JSONL, one line a prompt."""
    write_jsonl_atomic(path, [{"prompt": r["prompt"], "constraints": r["constraints"], "original": b, "trained": a,
                               "original_flags": fb, "trained_flags": fa} for r, b, a, fb, fa in zip(*answers)])


def flagged_examples(answers: tuple, n_trained: int = 6, n_original: int = 3) -> list[list[str]]:
    """The first flagged answers of each model, in prompt order: model, prompt, answer, flags."""
    records, before, after, flags_before, flags_after = answers
    rows = [["model", "prompt", "answer", "flags"]]
    for name, texts, flags, n in (("trained", after, flags_after, n_trained),
                                  ("original", before, flags_before, n_original)):
        hits = [[name, prompt_text(r["prompt"]), t, ", ".join(f)] for r, group, fs in zip(records, texts, flags)
                for t, f in zip(group, fs) if f]
        rows += hits[:n] or [[name, "", "(none flagged)", ""]]
    return rows


def warm_start_rows(s: dict) -> list[list[str]]:
    """The warm start: its counts, and where its model was evaluated, a column between the original and the
    trained model for the held-out and held-out-phrasings figures, with the warm start's paired change."""
    w = s["warm_start"]
    rows = [["warm start (SFT on the model's own passing answers)", "", "", "", ""],
            ["training prompts answered / answers sampled", f"{w['prompts']} / {w['answers']}", "", "", ""],
            ["answers meeting every constraint / also unflagged (passing)", f"{w['all_met']} / {w['passing']}", "",
             "", ""],
            ["prompts with a passing answer / SFT examples", f"{w['prompts_passing']} / {w['examples']}", "", "", ""]]
    if "held_out" not in w:
        return rows
    rows.append(["metric", "original", "warm start", "trained", "warm start - original (95% CI)"])
    for name, final in (("held_out", s), ("phrasings", s["phrasings"])):
        for key, label in (("all_met", "all constraints met"), ("fraction", "fraction of constraints met")):
            rows.append([f"{label} ({name.replace('_', '-')})", percent_ci(w[name][f"{key}_before"]),
                         percent_ci(w[name][f"{key}_after"]), percent_ci(final[f"{key}_after"]),
                         points_ci(w[name][f"{key}_change"])])
        any_flag = w[name]["flagged"]["any"]
        rows.append([f"answers with a degeneracy flag ({name.replace('_', '-')})", f"{any_flag[0]:.1%}",
                     f"{any_flag[1]:.1%}", f"{final['flagged']['any'][1]:.1%}", points_ci(w[name]["flagged_any_change"])])
    return rows


def write_report(out: Path, s: dict, answers: tuple, rounds: list[dict], console: Console,
                 phrasing_answers: tuple) -> None:
    """answers: (held-out records, the original's answers, the trained model's, and each answer's degeneracy
    flags: the original's, the trained model's), aligned by prompt; phrasing_answers: the same for the
    held-out-phrasings prompts."""
    records, before, after = answers[:3]
    rows = _result_rows(s)
    type_rows = [["constraint type", "original", "trained"]] + [
        [k, f"{b:.1%}", f"{a:.1%}"] for k, (b, a) in sorted(s["by_type"].items())]
    flag_rows = [["degeneracy flag", "original", "trained"]] + [
        [k, f"{b:.1%}", f"{a:.1%}"] for k, (b, a) in s["flagged"].items()]
    console.print(rich_table(f"SmolLM2-135M-Instruct, {s['method']} on verifiable constraint rewards "
                             f"({s['samples']} samples, {s['total_s'] / 60:.1f} min)", rows))
    console.print(rich_table("compliance per constraint type (held-out)", type_rows))
    console.print(rich_table("share of held-out answers with each degeneracy flag", flag_rows))
    phrasings = phrasing_tables(s["phrasings"], phrasing_answers)
    for caption in ("Held-out phrasings", "Per constraint type (held-out phrasings)"):
        console.print(rich_table(f"{caption} ({s['phrasings']['prompts']} prompts: every type, wordings training "
                                 f"never saw)" if caption == "Held-out phrasings" else caption, phrasings[caption]))
    warm = {"Warm start": warm_start_rows(s)} if "warm_start" in s else {}
    if warm:
        console.print(rich_table("warm start", warm["Warm start"]))
    examples = [{"prompt": r["prompt"][-1]["content"], "original": b[0], "trained": a[0]}
                for r, b, a in list(zip(records, before, after))[:8]]
    for e in examples[:3]:
        console.print(f"[bold]{escape(e['prompt'])}[/]\n  original: {escape(e['original'])}\n"
                      f"  trained:  {escape(e['trained'])}")
    curves = [{"step": r["round"], **r} for r in rounds]
    images = [plot_curves({"train": curves}, ["rollout_reward", "entropy", "response_length"], out / "curves.png",
                          "rollout reward, sampled-token entropy, response length (tokens) per round"),
              _type_bars(out / "per_type.png", s["by_type"])]
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    write_answers(out / "answers.jsonl", answers)
    write_answers(out / "answers_phrasings.jsonl", phrasing_answers)
    timing_rows = [["stage", "seconds"]] + [[k, f"{v:.1f}"] for k, v in s["timings_s"].items()]
    write_html_report(out / "report.html", f"alignkit rl: SmolLM2-135M-Instruct before and after {s['method']}",
                      {"Held-out results": rows, "Per constraint type": type_rows, "Degeneracy flags (share of "
                       "held-out answers)": flag_rows, "Flagged answers": flagged_examples(answers), **phrasings, **warm,
                       "Time": timing_rows}, images, examples)
    console.print(f"report: {out / 'report.html'}  (numbers: {out / 'summary.json'})")


def _type_bars(path: Path, by_type: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(by_type)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [by_type[n][0] for n in names], 0.4, label="original")
    ax.bar([i + 0.2 for i in x], [by_type[n][1] or 0.0 for n in names], 0.4, label="trained")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("share met (held-out)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
