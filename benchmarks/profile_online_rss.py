"""RSS by phase of alignkit online GRPO rounds at bench_grpo.py's setting: where the process's peak comes from.

    python benchmarks/profile_online_rss.py                               # fp32, as bench_grpo's `alignkit`
    python benchmarks/profile_online_rss.py --precision bf16 --engine-precision bf16
    python benchmarks/profile_online_rss.py --max-tokens-per-batch 512    # the learner in smaller micro-batches

SmolLM2-135M-Instruct, 4 prompts x k = 4, <= 64 new tokens, VADER reward, beta 0.04, three rounds. A thread samples
VmRSS every 20 ms and keeps the peak of each phase: load, rollout (generation and reward), scoring (the reference's
log-probs; the behaviour policy's too where a rollout feeds several updates), learning (forward, backward,
optimizer), the engine's weight update. Not run in CI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from rss_phases import PhasePeaks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--engine-precision", default="fp32")
    parser.add_argument("--max-tokens-per-batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--release", action="store_true", help="release_memory: true")
    parser.add_argument("--selective", action="store_true", help="selective_recompute: true")
    parser.add_argument("--evaluate", action="store_true", help="the held-out evaluation before and after (bench_grpo's)")
    parser.add_argument("--adam-moments", default="fp32", help="adam_moments: fp32 or bf16")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the vocabulary projection")
    parser.add_argument("--keep-probs-mb", type=int, default=None,
                        help="models.logprobs.KEEP_PROBS_BYTES in MiB (0: the backward recomputes the head)")
    args = parser.parse_args()
    phases = PhasePeaks()

    from bench_grpo import prompts, vader_scores

    import alignkit.models.logprobs as logprobs
    import alignkit.online.run as run
    from alignkit.generate.engines import fast
    from alignkit.online import online_config
    from alignkit.rewards.base import FunctionReward

    if args.keep_probs_mb is not None:
        logprobs.KEEP_PROBS_BYTES = args.keep_probs_mb * 2**20
    run.OnlineRun.round = phases.wrap("round, other", run.OnlineRun.round)  # so "setup" is only what runs outside
    run.sampling.collect_rollout = phases.wrap("rollout", run.sampling.collect_rollout)
    run.OnlineRun.learn = phases.wrap("learn", run.OnlineRun.learn)
    fast.FastEngine.update_weights = phases.wrap("engine update", fast.FastEngine.update_weights)
    grpo = run.ONLINE_METHODS["grpo"]
    run.ONLINE_METHODS["grpo"] = dataclasses.replace(grpo, experience=phases.wrap("score", grpo.experience))
    cfg = online_config({
        "method": "grpo", "model": "smollm2-135m-instruct", "prompts": "-", "output_dir": tempfile.mkdtemp(),
        "rounds": args.rounds, "prompts_per_round": 4, "num_samples": 4, "max_new_tokens": 64, "temperature": 1.0,
        "kl_coef": 0.04, "learning_rate": 1e-6, "eval_samples": 1, "progress": False, "max_length": 2048,
        "engine_precision": args.engine_precision, "precision": args.precision,
        "max_tokens_per_batch": args.max_tokens_per_batch, "evaluate": args.evaluate, "release_memory": args.release or None,
        "chunk_size": args.chunk_size, "selective_recompute": args.selective, "adam_moments": args.adam_moments})
    reward = FunctionReward(lambda prompt, response: vader_scores([response])[0], name="vader")
    phases.mark("setup")
    result = run.run_online(cfg, inputs=run.OnlineInputs(prompts(4 * args.rounds), prompts(1), reward))
    phases.mark("done")
    time.sleep(0.1)
    seconds = sum(r["time/generate_s"] + r["time/reward_s"] + r["time/score_s"] + r["time/learner_s"]
                  for r in result.rounds[1:]) / max(1, len(result.rounds) - 1)
    out = {"args": vars(args), "peak_rss_gb_by_phase": phases.rounded(),
           "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "s_per_round_after_first": seconds}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
