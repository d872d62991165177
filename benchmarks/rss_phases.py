"""Peak RSS by phase, for the profile_*_rss.py scripts: a thread samples VmRSS every 20 ms and keeps the peak of
whichever phase is current."""

from __future__ import annotations

import threading
import time


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


class PhasePeaks:
    def __init__(self, first: str = "load", interval_s: float = 0.02):
        self.phase, self.peaks = first, {}
        threading.Thread(target=self._sample, args=(interval_s,), daemon=True).start()

    def _sample(self, interval_s: float) -> None:
        while True:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss_gb())
            time.sleep(interval_s)

    def mark(self, name: str, echo: bool = False) -> None:
        self.phase = name
        if echo:
            print(f"{time.strftime('%X')} {name}: RSS {rss_gb():.2f} GB", flush=True)

    def wrap(self, name: str, fn):
        """fn, with `name` the phase while it runs (the previous phase back after)."""
        def wrapper(*args, **kwargs):
            previous, self.phase = self.phase, name
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = previous
        return wrapper

    def rounded(self) -> dict:
        return {k: round(v, 3) for k, v in self.peaks.items()}
