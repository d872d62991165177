"""Where alignkit's DPO step spends its time: torch.profiler over forward + backward of one packed batch.

    python benchmarks/profile_alignkit_step.py --model llama58m --precision bf16 [--attention sdpa --max-tokens-per-row 512]

Uses the headline benchmark's data (run bench_dpo.py once first) and its first `--pairs` pairs."""

from __future__ import annotations

import argparse
import json
import time

import dpo_contenders as contenders
import torch
from torch.profiler import ProfilerActivity, profile

from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.pack import pack
from alignkit.losses import build_options, get_loss
from alignkit.models.attention import set_attention
from alignkit.models.logprobs import response_logprobs
from alignkit.train.reference import Reference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["llama58m", "smollm2"], default="llama58m")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--max-tokens-per-row", type=int, default=4096)
    parser.add_argument("--attention", default="packed_sdpa", help="alignkit's `attention:` (packed_sdpa, sdpa, ...)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="rows of the operator table")
    args = parser.parse_args()

    model_ref = str(contenders.LLAMA58M_DIR) if args.model == "llama58m" else "smollm2-135m-instruct"
    model, tokenizer = contenders.load_model(model_ref)
    model.train()
    set_attention(model, args.attention)
    data = contenders.WORK_DIR / "data" / f"{args.model}_headline.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines()][:args.pairs]
    examples = prepare_examples(records, tokenizer, ExampleSettings("pairs", 4096))
    spec, opts = get_loss("dpo"), build_options(get_loss("dpo"), {"beta": 0.1})
    pad_id = tokenizer.pad_token_id or 0
    batch = pack(examples, list(range(len(examples))), args.max_tokens_per_row, pad_id)
    print(f"rows {tuple(batch.input_ids.shape)}, real tokens {batch.num_tokens}, response tokens {len(batch.token_targets)}")
    with torch.no_grad():
        ref_seq = response_logprobs(model, batch).seq_logps.detach()
    ref = Reference(ref_seq + 0.1, [torch.zeros(0)] * len(examples))  # any reference: the cost is the policy's

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = response_logprobs(model, batch)
            from alignkit.losses import LossInputs

            inputs = LossInputs(logps=out.seq_logps.float(), lengths=out.lengths)
            inputs.ref_logps = ref.seq_logps
            losses, _ = spec.fn(inputs, opts)
        losses.mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    print(f"forward+backward: {', '.join(f'{t:.2f}' for t in times)} s")
    tic = time.perf_counter()
    for _ in range(10):
        batch.attention_mask(torch.float32)
    print(f"attention_mask(): {(time.perf_counter() - tic) / 10 * 1000:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
