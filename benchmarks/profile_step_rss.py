"""RSS by phase of alignkit DPO steps at the long-prompt setting: where the process's peak comes from.

    python benchmarks/profile_step_rss.py                    # 4 pairs x 1800-1950-token prompts, checkpointing on
    python benchmarks/profile_step_rss.py --no-release       # glibc's default allocator policy (release_memory off)
    python benchmarks/profile_step_rss.py --no-gc --pairs 1

SmolLM2-135M-Instruct, fp32, two optimizer steps. A thread samples VmRSS every 20 ms and keeps the peak of each
phase: reference pass, forward + backward, optimizer, between steps. Not run in CI."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import dpo_contenders as contenders  # noqa: E402
from rss_phases import PhasePeaks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--no-gc", action="store_true")
    parser.add_argument("--no-release", action="store_true", help="release_memory: false")
    args = parser.parse_args()
    phases = PhasePeaks()

    def mark(name):
        phases.mark(name, echo=True)

    model, tokenizer = contenders.load_model("smollm2-135m-instruct")
    records = contenders.make_records(tokenizer, 2 * args.pairs, (1800, 1950), (60, 90), 0)
    data = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    import alignkit.train.loop as loop
    import alignkit.train.offline_data as offline_data
    import alignkit.train.run as run
    from alignkit.config import TrainConfig
    from alignkit.train.step import Stepper

    offline_data.plan_steps = lambda examples, cfg: [[list(range(s * args.pairs, (s + 1) * args.pairs))]
                                                     for s in range(2)]
    run.save_final = lambda *a, **k: None
    run.write_model_card = lambda *a, **k: None
    step = Stepper.step

    def probed_step(self, *a, **k):
        mark("forward + backward")
        if not getattr(self.optimizer, "probed", False):
            optimizer_step = self.optimizer.step

            def probed_optimizer_step(*aa, **kk):
                mark("optimizer")
                return optimizer_step(*aa, **kk)

            self.optimizer.step, self.optimizer.probed = probed_optimizer_step, True
        out = step(self, *a, **k)
        mark("between steps")
        return out

    Stepper.step = probed_step
    cfg = TrainConfig(model="smollm2-135m-instruct", train_data=str(data), output_dir=tempfile.mkdtemp(), loss="dpo",
                      loss_options={"beta": 0.1}, max_length=4096, learning_rate=1e-5, lr_schedule="linear",
                      max_steps=2, ref_cache=False, progress=False, gradient_checkpointing=not args.no_gc,
                      release_memory=not args.no_release)
    mark("reference pass")
    loop.train(cfg, model, tokenizer)
    mark("end")
    print(json.dumps({"peak_rss_gb_by_phase": phases.rounded(),
                      "process_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}, indent=1))


if __name__ == "__main__":
    main()
