"""How fast could a step be on this machine? A lower bound on the time of one step of bench_grpo.py and
bench_distill.py's on-policy distillation, from the matrix products they cannot avoid and this machine's own
matmul speed at their shapes, against the time the issues' speed targets allow (a ratio to TRL's measured s/step in
benchmarks/results/*.json).

The bound counts only what every implementation must do, on the completions' tokens only (prompts are free here):
- decoding: each generated token passes every decoder layer and the LM head once, in batches of the step's
  samples (M = samples: weight-streaming shapes);
- scoring: one forward of the reference (GRPO with beta > 0) or the teacher (distillation) over the completions;
- learning: forward and backward of the trained model over the completions (the backward timed as two forwards:
  the same FLOPs, though its products' shapes differ).
Each product is timed here with torch.matmul at its real shape (M x K @ K x N, the precision of the contender,
the threads given), best of 5 with its operands warm in cache (a real decode streams every layer's weights from
memory), so attention, norms, sampling, the optimizer, Python and data movement all come on top: a real step is
slower than the bound. If the bound is above the target's time, no implementation reaches the target
on this machine at these settings.

    python benchmarks/roofline.py --threads 2    # writes benchmarks/results/roofline.md and .json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def smollm2_shapes(layers: int = 30) -> dict:
    """SmolLM2-135M's products per token (hidden 576, 9 query heads and 3 KV heads of 64, MLP 1536, vocab 49152)
    as (K, N) pairs: per decoder layer the fused QKV, the output projection, the fused gate/up and the down
    projection; once the LM head."""
    hidden, q, kv, mlp, vocab = 576, 576, 192, 1536, 49152
    return {"layer": [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * mlp), (mlp, hidden)], "layers": layers,
            "head": (hidden, vocab)}


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Seconds of one [m, k] @ [k, n] product (best of repeats after a warm-up)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - tic)
    return best


def forward_seconds(shapes: dict, layers: int, m: int, dtype: torch.dtype, head: bool = True) -> float:
    """One forward of `layers` decoder layers (and the head) for m tokens at once: the sum of its products."""
    per_layer = sum(time_matmul(m, k, n, dtype) for k, n in shapes["layer"])
    return layers * per_layer + (time_matmul(m, *shapes["head"], dtype) if head else 0.0)


def flops(shapes: dict, layers: int, tokens: int) -> float:
    return 2 * tokens * (layers * sum(k * n for k, n in shapes["layer"]) + shapes["head"][0] * shapes["head"][1])


def bound(name: str, samples: int, new_tokens: int, trained_layers: int, scorer_layers: int, dtype: torch.dtype,
          trl_s_per_step: float, target: float) -> dict:
    """The step's lower bound: decode (new_tokens steps of M = samples), the scorer's forward and the learner's
    forward + backward over samples x new_tokens tokens, each product timed at its shape."""
    shapes, tokens = smollm2_shapes(), samples * new_tokens
    decode = new_tokens * forward_seconds(shapes, trained_layers, samples, dtype)
    score = forward_seconds(shapes, scorer_layers, tokens, dtype)
    learn = 3 * forward_seconds(shapes, trained_layers, tokens, dtype)
    total_flops = (flops(shapes, trained_layers, tokens) * 4 + flops(shapes, scorer_layers, tokens))
    allowed = trl_s_per_step / target
    return {"setting": name, "dtype": str(dtype).removeprefix("torch."), "samples": samples, "new_tokens": new_tokens,
            "decode_s": decode, "score_s": score, "learn_s": learn, "bound_s": decode + score + learn,
            "tflop": total_flops / 1e12, "trl_s_per_step": trl_s_per_step, "target": target, "allowed_s": allowed}


def measured(path: Path, contender: str) -> float | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = data.get("contenders", data)
    row = rows.get(contender) if isinstance(rows, dict) else None
    return row.get("s_per_step") if row else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "roofline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from contenders import machine

    trl_bf16_grpo = measured(RESULTS / "grpo.json", "trl_bf16") or 19.97
    trl_distill = measured(RESULTS / "distill.json", "trl_distill") or 16.20
    rows = [
        # bench_grpo: 4 prompts x 4, 64 tokens; the 30-layer policy trained, its reference scores (beta 0.04)
        bound("GRPO (bench_grpo), bf16", 16, 64, 30, 30, torch.bfloat16, trl_bf16_grpo, 4.0),
        # bench_distill: the 15-layer student trained and sampling, the 30-layer teacher scores
        bound("on-policy distillation (bench_distill), bf16", 16, 64, 15, 30, torch.bfloat16, trl_distill, 3.0),
        bound("on-policy distillation (bench_distill), fp32", 16, 64, 15, 30, torch.float32, trl_distill, 3.0),
    ]
    ours = {"GRPO (bench_grpo), bf16": measured(RESULTS / "grpo.json", "alignkit_bf16_lean"),
            "on-policy distillation (bench_distill), bf16": measured(RESULTS / "distill.json", "alignkit_opd_bf16"),
            "on-policy distillation (bench_distill), fp32": measured(RESULTS / "distill.json", "alignkit_opd")}
    lines = [f"# Lower bounds on a step's time from its matrix products ({machine()}, {args.threads} threads, torch "
             f"{torch.__version__})", "",
             "Command: `python benchmarks/roofline.py --threads 2`. The bound is the time of the products every "
             "implementation must run on the completions' tokens (decode at M = samples, the scorer's forward, the "
             "learner's forward and backward), each timed here as one torch.matmul at its shape; everything else "
             "(attention, norms, sampling, the optimizer, Python) comes on top. allowed: TRL's measured s/step "
             "(benchmarks/results/*.json) divided by the issue's target ratio.", "",
             "| setting | decode s | score s | learn s | bound s/step | TFLOP | alignkit s/step (measured) | TRL s/step "
             "| target | allowed s/step | bound / allowed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        row["alignkit_s_per_step"] = ours[row["setting"]]
        mine = f"{row['alignkit_s_per_step']:.2f}" if row["alignkit_s_per_step"] else "–"
        lines.append(f"| {row['setting']} | {row['decode_s']:.2f} | {row['score_s']:.2f} | {row['learn_s']:.2f} | "
                     f"{row['bound_s']:.2f} | {row['tflop']:.2f} | {mine} | {row['trl_s_per_step']:.2f} | "
                     f"{row['target']:.0f}x | {row['allowed_s']:.2f} | {row['bound_s'] / row['allowed_s']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "threads": args.threads,
                                                         "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
