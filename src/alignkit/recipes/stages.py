"""A main job's stages, announced as they start and timed (the summary's `timings_s`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Stages:
    def __init__(self, console):
        self.console, self.seconds = console, {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        self.console.print(f"[bold]{name}[/] ...")
        value = fn()
        self.seconds[name] = time.perf_counter() - start
        return value
