"""Each contender of a benchmark in its own process: the script runs itself again with `--one NAME` and the same
arguments, and that run prints one `RESULT {json}` line, so no contender's imports, caches or peak memory reach
another's."""

from __future__ import annotations

import json
import os
import platform
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


def cpu() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags, from /proc/cpuinfo (elsewhere: the platform's name, no flags)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def machine() -> str:
    """The CPU's model name, its bf16 units and core count. bf16 timings move with the CPU: the same commit's bf16
    GRPO step took 5.9 s on 2026-12-02's machine and 8.2-8.7 s on 2026-12-07's (AMD EPYC, avx512_bf16)."""
    model, flags = cpu()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, bf16 units: {', '.join(bf16) or 'none'}"
