"""The torchrun worker of test_distributed.py: runs its scenarios one after another in the same processes and writes
each one's outcome to OUT/<name>.rank<r>.json (the exit code and what the rank wrote to stderr meanwhile), so that
each scenario's test checks it on its own.

    python -m torch.distributed.run ... distributed_worker.py OUT NAME=COMMAND:CONFIG ...

A scenario is `alignkit COMMAND --config CONFIG`; CONFIG@N instead raises inside the Nth micro-batch forward (the
Nth step: one micro-batch per rank per step), as a crash would (its exit is "crashed"), and a later scenario
resumes that run."""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from alignkit.api import build_config
from alignkit.cli import main
from alignkit.train import loop
from alignkit.train.method import Method


class Crash(Exception):
    pass


def crash_at(call, real=Method.forward):
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise Crash
        return real(*args, **kwargs)
    return counting


def run(command: str, config: str) -> int | str:
    path, _, crash = config.partition("@")
    if not crash:
        return main([command, "--config", path])
    real, Method.forward = Method.forward, crash_at(int(crash))
    try:
        loop.train(build_config(config=path))
        return "the crash did not happen"
    except Crash:
        return "crashed"
    finally:
        Method.forward = real


@contextmanager
def stderr_to(path: Path):
    """File descriptor 2 into `path`: the log handlers and the console hold sys.stderr, which writes there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "w") as file:
            os.dup2(file.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_scenarios(out: Path, scenarios: list[str]) -> None:
    rank = dist.get_rank()
    for scenario in scenarios:
        name, _, spec = scenario.partition("=")
        command, _, config = spec.partition(":")
        log = out / f"{name}.rank{rank}.log"
        outcome = {"exit": None, "error": None}
        with stderr_to(log):
            try:
                outcome["exit"] = run(command, config)
            except Exception:
                outcome["error"] = traceback.format_exc()
        outcome["stderr"] = log.read_text()
        sys.stderr.write(outcome["stderr"])  # the torchrun output keeps everything, for a failure's message
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(outcome))
        if outcome["error"]:  # the ranks may now wait on different collectives: stop rather than hang
            raise SystemExit(f"{name} raised:\n{outcome['error']}")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    run_scenarios(Path(sys.argv[1]), sys.argv[2:])
    dist.destroy_process_group()
