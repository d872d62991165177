"""Where a DPO step's memory goes: every tensor autograd keeps for the backward pass, by the op that saved it.

    python benchmarks/profile_memory.py --model smollm2 --pairs 4 --prompt-tokens 1800 1950 --answer-tokens 60 90 \
        --attention packed_sdpa sdpa

For each attention path: one packed batch of the long-prompt setting (bench_dpo.py's synthetic pairs), one
forward of the policy, then a walk of the autograd graph from the loss. Each node's saved tensors (the
`_saved_*` attributes of built-in nodes, `saved_tensors` of custom functions) are counted once per storage
and grouped by node type. A tensor with two dimensions of at least the prompt length is marked L^2; a float32
tensor whose shape equals a saved tensor of another dtype is marked as a copy. Peak RSS of the whole step
(forward + backward) is measured in a fresh subprocess per path. Writes benchmarks/results/memory_profile.{md,json}."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import dpo_contenders as contenders
import torch

from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.pack import pack
from alignkit.models.attention import set_attention
from alignkit.models.logprobs import response_logprobs

RESULTS = Path(__file__).resolve().parent / "results"


def saved_tensors(loss: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(node type, tensor) for every tensor the graph behind `loss` keeps, each storage once."""
    seen_nodes, seen_storage, out = set(), set(), []
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    value = getattr(node, name)
                except RuntimeError:  # freed or not a tensor
                    continue
                tensors += [value] if isinstance(value, torch.Tensor) else \
                    [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (list, tuple)) else []
        if hasattr(node, "saved_tensors"):
            try:
                tensors += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
            except RuntimeError:
                pass
        for tensor in tensors:
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if key not in seen_storage and tensor.untyped_storage().nbytes() > 0:
                seen_storage.add(key)
                out.append((type(node).__name__, tensor))
        stack += [next_node for next_node, _ in node.next_functions]
    return out


def batch_for(args, tokenizer):
    records = contenders.make_records(tokenizer, args.pairs, tuple(args.prompt_tokens), tuple(args.answer_tokens),
                                      args.seed)
    examples = prepare_examples(records, tokenizer, ExampleSettings("pairs", args.max_length))
    return pack(examples, list(range(len(examples))), args.max_length * args.pairs, tokenizer.pad_token_id or 0)


def profile(args, variant: str) -> dict:
    """variant: an attention implementation, optionally +selective (selective_recompute). (Gradient checkpointing
    is not profiled here: reading a checkpointed node's saved tensors recomputes them.)"""
    attention, *extras = variant.split("+")
    model, tokenizer = contenders.load_model("smollm2-135m-instruct")
    model.train()
    set_attention(model, attention)
    if "selective" in extras:
        from alignkit.models.fused import apply_selective_recompute

        apply_selective_recompute(model)
    batch = batch_for(args, tokenizer)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out = response_logprobs(model, batch)
    loss = -torch.nn.functional.logsigmoid(0.1 * (out.seq_logps[:, 0] - out.seq_logps[:, 1])).mean()
    groups = defaultdict(lambda: {"bytes": 0, "count": 0, "shapes": set(), "l2": 0, "copies": 0})
    shapes_by_dtype = defaultdict(set)
    items = [(n, t) for n, t in saved_tensors(loss) if t.untyped_storage().data_ptr() not in params]
    for _, t in items:
        shapes_by_dtype[tuple(t.shape)].add(t.dtype)
    long = min(args.prompt_tokens)
    total = l2 = copies = 0
    for node, t in items:
        nbytes = t.untyped_storage().nbytes()
        g = groups[node]
        g["bytes"] += nbytes
        g["count"] += 1
        g["shapes"].add(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        total += nbytes
        if sum(d >= long for d in t.shape) >= 2:
            g["l2"] += nbytes
            l2 += nbytes
        if t.dtype == torch.float32 and len(shapes_by_dtype[tuple(t.shape)]) > 1:
            g["copies"] += nbytes
            copies += nbytes
    del items, t  # hold no saved tensor through backward: the peak RSS is the step's own
    loss.backward()
    rows = sorted(({"node": n, **{k: (sorted(v)[:3] if k == "shapes" else v) for k, v in g.items()}}
                   for n, g in groups.items()), key=lambda r: -r["bytes"])
    return {"attention": variant, "tokens": int(batch.num_tokens), "rows_shape": list(batch.input_ids.shape),
            "saved_bytes": total, "l2_bytes": l2, "fp32_copy_bytes": copies, "by_node": rows,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2"], default="smollm2")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(1800, 1950))
    parser.add_argument("--answer-tokens", type=int, nargs=2, default=(60, 90))
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", nargs="+", default=["packed_sdpa", "packed_sdpa+selective"],
                        help="variants: an attention implementation, optionally +selective")
    parser.add_argument("--name", default="memory_profile", help="results file stem")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: profile one path, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(profile(args, args.one)))
        return
    results = []
    for attention in args.attention:  # each in its own process: peak RSS is per path
        cmd = [sys.executable, __file__, "--one", attention, "--pairs", str(args.pairs), "--max-length",
               str(args.max_length), "--seed", str(args.seed), "--prompt-tokens", *map(str, args.prompt_tokens),
               "--answer-tokens", *map(str, args.answer_tokens)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            results.append({"attention": attention, "error": run.stderr[-500:]})
            continue
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/profile_memory.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "results": results}, indent=2))
    gb = 1e9
    lines = ["# Memory of one DPO step by saved tensor", "", f"`{command}`", "",
             "| attention | tokens | saved for backward | of it L² | of it fp32 copies | peak RSS (step) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['attention']} | error | | | | |")
            continue
        lines.append(f"| {r['attention']} | {r['tokens']} | {r['saved_bytes'] / gb:.2f} GB | {r['l2_bytes'] / gb:.2f} GB | "
                     f"{r['fp32_copy_bytes'] / gb:.2f} GB | {r['peak_rss_bytes'] / gb:.2f} GB |")
    for r in results:
        if "error" in r:
            continue
        lines += ["", f"## {r['attention']}: the ops that keep the most", "",
                  "| autograd node | tensors | bytes | L² bytes | example shapes |", "|---|---:|---:|---:|---|"]
        for row in r["by_node"][:12]:
            lines.append(f"| {row['node']} | {row['count']} | {row['bytes'] / gb:.3f} GB | {row['l2'] / gb:.3f} GB | "
                         f"{'; '.join(row['shapes'])} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
