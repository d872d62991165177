"""The mutation-testing report of `make mutants`: per module, how many of mutmut's mutants the tests killed, and
every survivor with its diff, marked where benchmarks/mutants_equivalent.txt names it equivalent (a change no
test can see: same value, or only an error message's wording). Run from the repository root after `mutmut run`;
writes benchmarks/results/mutants.md and mutants.json."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"losses": 0.90, "data/pack.py": 0.90}  # the target: >= 90% killed
DETECTED = ("killed", "timeout")  # a mutant that hangs the tests is caught as surely as one that fails them


def equivalents() -> dict[str, str]:
    """mutant name -> why it cannot be told apart from the original (one `name: reason` per line)."""
    path = ROOT / "benchmarks" / "mutants_equivalent.txt"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(":")
            out[name.strip()] = reason.strip()
    return out


DEVICE_ARG = re.compile(r"\bdevice=[^,()]+(\([^()]*\))?,?\s*|\.to\([A-Za-z_.]*\.device\)|\.to\(None\)")
LONG_ARG = re.compile(r"\bdtype=(torch\.long|None),?\s*")
DTYPE_ARG = re.compile(r"\bdtype=([A-Za-z_.]+\.dtype|None),?\s*|\.to\([A-Za-z_.]*\.dtype\)|\.to\(None\)")


def equivalent_by_rule(diff: str) -> str | None:
    """A mutant that only drops or nulls a device argument (`device=x.device` -> `device=None`, `.to(x.device)` ->
    `.to(None)`): the tests run on CPU, where that is the default device, so no CPU test can tell them apart. Or
    one that drops `dtype=torch.long` from a tensor built of Python ints (int64 either way), or a cast to another
    tensor's dtype (`.to(x.dtype)` -> `.to(None)`) where the tests' dtypes agree or promotion gives the same values."""
    minus = [line[1:] for line in diff.splitlines()[2:] if line.startswith("-")]
    plus = [line[1:] for line in diff.splitlines()[2:] if line.startswith("+")]
    if len(minus) != len(plus) or not minus:
        return None
    def norm(line: str, pattern) -> str:
        return re.sub(r"[\s,]+\)", ")", pattern.sub("", line)).replace(" ", "")
    if all(norm(a, DEVICE_ARG) == norm(b, DEVICE_ARG) for a, b in zip(minus, plus)):
        return "a device argument only: the same tensor on CPU, where every test runs"
    if all("torch.long" in a for a in minus) and all(norm(a, LONG_ARG) == norm(b, LONG_ARG) for a, b in zip(minus, plus)):
        return "dtype=torch.long dropped where the data are Python ints: torch infers int64, the same tensor"
    if all(norm(a, DTYPE_ARG) == norm(b, DTYPE_ARG) for a, b in zip(minus, plus)):
        return "a cast to another tensor's dtype dropped: the dtypes agree, or type promotion gives the same values"
    return None


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT / "mutants" / "src" / "alignkit").as_posix()
    return "losses" if rel.startswith("losses/") else rel.removesuffix(".py")


def main() -> None:
    equivalent = equivalents()
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors = defaultdict(list)
    for meta in sorted((ROOT / "mutants" / "src").rglob("*.py.meta")):
        source = meta.with_suffix("")  # .../x.py
        data = SourceFileMutationData(path=source.relative_to(ROOT / "mutants"))
        data.load()
        for name, code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[code]
            module = module_of(source)
            if status not in DETECTED:
                diff = get_diff_for_mutant(name, path=data.path)
                reason = equivalent.get(name) or equivalent_by_rule(diff)
                if reason:
                    status = "equivalent"
                    survivors[module].append((name, f"equivalent: {reason}", diff))
                else:
                    survivors[module].append((name, status, diff))
            counts[module][status] += 1

    rows, summary = [], {}
    for module in sorted(counts):
        c = counts[module]
        total = sum(c.values())
        detected = sum(c[s] for s in DETECTED)
        scored = total - c["equivalent"]
        score = detected / scored if scored else 1.0
        target = next((t for prefix, t in TARGETS.items() if module.startswith(prefix.removesuffix(".py"))), None)
        summary[module] = {"mutants": total, "killed": c["killed"], "timeout": c["timeout"],
                           "survived": c["survived"], "no_tests": c["no tests"], "equivalent": c["equivalent"],
                           "score": score, "target": target}
        verdict = "" if target is None else (" met" if score >= target else f" **missed** (target {target:.0%})")
        rows.append(f"| `{module}` | {total} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no tests']} | "
                    f"{c['equivalent']} | {score:.1%}{verdict} |")
    lines = ["# Mutation testing (`make mutants`)", "",
             "mutmut 3 mutates the numerical core and the verifiable rewards and runs, for each mutant, only the tests "
             "that call the mutated function ([tool.mutmut] in pyproject.toml). Score = (killed + timeout) / "
             "(mutants − equivalent). Survivors are listed below with their diff; equivalent ones with the reason.",
             "", "| module | mutants | killed | timeout | survived | no tests | equivalent | score |",
             "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]
    for module in sorted(survivors):
        lines += [f"## `{module}`: {len(survivors[module])} not killed", ""]
        for name, status, diff in survivors[module]:
            lines.append(f"- `{name}` ({status})")
            if diff:
                lines += ["", "```diff", *diff.splitlines()[2:], "```", ""]
        lines.append("")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutants.md").write_text("\n".join(lines))
    (out / "mutants.json").write_text(json.dumps(summary, indent=2))
    for module, s in summary.items():
        print(f"{module:32s} {s['score']:.1%} of {s['mutants'] - s['equivalent']}")


if __name__ == "__main__":
    main()
