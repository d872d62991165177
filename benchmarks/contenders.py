"""Each contender of a benchmark in its own process: the script runs itself again with `--one NAME` and the same
arguments, and that run prints one `RESULT {json}` line, so no contender's imports, caches or peak memory reach
another's."""

from __future__ import annotations

import json
import subprocess
import sys


def print_result(result: dict) -> None:
    """The `--one` run's answer to its parent."""
    print("RESULT " + json.dumps(result))


def run_in_own_process(script: str, name: str, args, skip: tuple[str, ...] = ()) -> dict:
    """`script --one name` with args' other values (not `one`, `contenders`, `skip`, or unset ones) as flags; the
    dict its RESULT line holds. A failed run stops the benchmark with the end of its stderr."""
    flags = [x for k, v in vars(args).items() if k not in ("one", "contenders", *skip) and v is not None
             for x in (f"--{k.replace('_', '-')}", str(v))]
    run = subprocess.run([sys.executable, script, "--one", name, *flags], capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{run.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])
