"""The worker side of bench_dpo.py: shared model and data, each contender's run, and the loss-equality check.

Each function here runs inside its own subprocess (started by bench_dpo.py) and returns a JSON-able dict, so
peak memory is per contender and nothing one contender imported or allocated is seen by another."""

from __future__ import annotations

import hashlib
import json
import random
import resource
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / "work"
LLAMA58M_DIR = WORK_DIR / "llama58m"
LLAMA58M_SEED = 1234
LLAMA58M_VOCAB = 32000


# ----------------------------------------------------------------------------------------------------------------
# Model and data, identical for every contender.


def ensure_llama58m() -> Path:
    """A randomly initialised Llama (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000: 58.1M
    parameters, untied head) and a word-level tokenizer over 'w0'..'w31991', saved once so every contender
    loads identical weights."""
    marker = LLAMA58M_DIR / "bench_model.json"
    if marker.exists():
        return LLAMA58M_DIR
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models.tiny import SPECIAL_TOKENS, build_word_tokenizer

    tokenizer = build_word_tokenizer([f"w{i}" for i in range(LLAMA58M_VOCAB - len(SPECIAL_TOKENS))])
    assert len(tokenizer) == LLAMA58M_VOCAB
    config = LlamaConfig(
        vocab_size=LLAMA58M_VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(LLAMA58M_SEED)
    model = LlamaForCausalLM(config)
    tmp = LLAMA58M_DIR.with_name(LLAMA58M_DIR.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / "bench_model.json").write_text(json.dumps({"seed": LLAMA58M_SEED, "parameters": n_params}))
    tmp.rename(LLAMA58M_DIR)
    return LLAMA58M_DIR


def load_model(model_ref: str):
    """model + tokenizer, loaded the same way for every contender (fp32, SDPA attention)."""
    from alignkit.models.resolve import load_model_and_tokenizer

    return load_model_and_tokenizer(model_ref)


def load_tokenizer(model_ref: str):
    from transformers import AutoTokenizer

    from alignkit.models.resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model_ref))


def word_pool(tokenizer, limit: int = 4000) -> list[str]:
    """Words that are exactly one token when preceded by a space, so ' w1 w2 ...' tokenises to one id per word
    and prompt + response text tokenises to prompt ids + response ids (what TRL's string concatenation needs)."""
    vocab = tokenizer.get_vocab()
    if "w0" in vocab:  # the word-level tokenizer of llama58m
        return sorted((w for w in vocab if w[:1] == "w" and w[1:].isdigit()), key=vocab.get)
    candidates = sorted(((i, t[1:]) for t, i in vocab.items()
                         if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and t[1:].islower()
                         and len(t) >= 4), key=lambda pair: pair[0])
    pool = []
    for token_id, word in candidates:
        if tokenizer(" " + word, add_special_tokens=False)["input_ids"] == [token_id]:
            pool.append(word)
        if len(pool) == limit:
            break
    return pool


def make_records(tokenizer, n_pairs: int, prompt_range: tuple[int, int], answer_range: tuple[int, int],
                 seed: int) -> list[dict]:
    """Deterministic preference pairs of random words. Lengths are in tokens: the prompt has uniform
    [lo, hi] tokens; each answer uniform [lo, hi] tokens *including* the EOS both tools append."""
    pool = word_pool(tokenizer)
    rng = random.Random(seed)

    def words(n):
        return "".join(" " + rng.choice(pool) for _ in range(n))

    records = []
    for _ in range(n_pairs):
        prompt = words(rng.randint(*prompt_range))
        chosen, rejected = (words(rng.randint(*answer_range) - 1) for _ in range(2))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def tokens_fingerprint(triples) -> str:
    """Hash of (prompt_ids, chosen_ids, rejected_ids) for every pair: equal across contenders iff they train
    on the same token ids."""
    digest = hashlib.blake2b(digest_size=8)
    for triple in triples:
        digest.update(repr(tuple(list(x) for x in triple)).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Memory and timing.


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Probe:
    """Step-end timestamps, per-step losses, and peak RSS: whole process (ru_maxrss) and 'train' = from the end
    of the first step to the end of the last (Linux VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self):
        self.step_begins: list[float] = []  # where a contender reports it (TRL: on_step_begin; alignkit: Stepper.step)
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []  # process CPU seconds (all threads) at each step end
        self.losses: list[float] = []
        self.peak_before_reset_kb = 0
        self.train_peak_kb = None

    def step_begin(self) -> None:
        self.step_begins.append(time.perf_counter())

    def step_end(self, loss: float) -> None:
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())
        self.losses.append(float(loss))
        if len(self.step_ends) == 1:
            self.peak_before_reset_kb = _status_kb("VmHWM")
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset_ok = True
            except OSError:
                self.reset_ok = False

    def finish(self) -> dict:
        hwm = _status_kb("VmHWM")
        self.train_peak_kb = hwm if getattr(self, "reset_ok", False) else None
        process_peak_kb = max(self.peak_before_reset_kb, hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return {"step_begins": self.step_begins, "step_ends": self.step_ends, "step_cpu": self.step_cpu, "losses": self.losses,
                "peak_rss_kb": process_peak_kb,
                "train_peak_rss_kb": self.train_peak_kb}


# ----------------------------------------------------------------------------------------------------------------
# Contenders.


def run_trl(spec: dict, variant: str) -> dict:
    """TRL's DPOTrainer. 'defaults': DPOConfig as a user gets it (gradient checkpointing on, a reference model
    copy run every step), except fp32 and the run-length settings every contender shares. 'fastest': no gradient
    checkpointing, reference log-probs precomputed once (no reference model in memory while training), and
    padding_free=True asked for: TRL 1.16 turns it off again with a warning ("temporarily unavailable after a
    refactor"), recorded as padding_free_effective."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load_model(spec["model"])
    probe = Probe()

    class RecordingDPOTrainer(DPOTrainer):
        step_loss = float("nan")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.step_loss = float((out[0] if return_outputs else out).detach())
            return out

    class StepEnd(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            probe.step_begin()

        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end(trainer.step_loss)

    options = {}
    if variant.startswith("fastest"):
        options = dict(gradient_checkpointing=False, precompute_ref_log_probs=True, padding_free=True)
    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=spec["pairs_per_step"], gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], beta=spec["beta"],
        max_length=spec["max_length"], bf16=variant.endswith("bf16"), use_cpu=True, seed=0,
        train_sampling_strategy="sequential", logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, **options,
    )
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    trainer = RecordingDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                                  processing_class=tokenizer)
    trainer.add_callback(StepEnd())
    data = trainer.train_dataset
    fingerprint = tokens_fingerprint(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    trainer.train()
    return {**probe.finish(), "tokens_fingerprint": fingerprint, "padding_free_effective": trainer.padding_free,
            "gradient_checkpointing": args.gradient_checkpointing, "optimizer": type(trainer.optimizer).__name__,
            "optim": str(args.optim)}


def run_alignkit(spec: dict, precision: str, **options) -> dict:
    """alignkit's one loop, `train(cfg, model, tokenizer)`, unmodified except what the benchmark must fix:
    the step plan (the same consecutive pairs per step as TRL's sequential sampler, instead of alignkit's
    token-budget batches), no final save (TRL is run with save_strategy='no'), and a probe on the metrics log."""
    import alignkit.train.loop as loop
    import alignkit.train.offline_data as offline_data
    import alignkit.train.run as run
    from alignkit.config import TrainConfig
    from alignkit.train.step import Stepper

    model, tokenizer = load_model(spec["model"])
    probe = Probe()
    pairs, n_steps = spec["pairs_per_step"], spec["warmup"] + spec["steps"]
    seen = {}

    def fixed_plan(examples, cfg):
        seen["examples"] = examples
        return [[list(range(s * pairs, (s + 1) * pairs))] for s in range(n_steps)]

    class ProbedLog(run.MetricsLog):
        def write(self, step, metrics):
            probe.step_end(metrics["loss"])
            super().write(step, metrics)

    step = Stepper.step

    def probed_step(self, *args, **kwargs):
        probe.step_begin()
        return step(self, *args, **kwargs)

    Stepper.step = probed_step
    offline_data.plan_steps = fixed_plan
    run.save_final = lambda *args, **kwargs: None
    run.write_model_card = lambda *args, **kwargs: None  # it writes into final/, which is not saved here
    run.MetricsLog = ProbedLog
    cfg = TrainConfig(
        model=spec["model"], train_data=spec["data"], output_dir=tempfile.mkdtemp(prefix="bench_alignkit_"),
        loss="dpo", loss_options={"beta": spec["beta"]}, max_length=spec["max_length"],
        learning_rate=spec["lr"], lr_schedule="linear", max_steps=n_steps, precision=precision,
        ref_cache=False, progress=False, **{**spec.get("alignkit_options", {}), **options},
    )
    loop.train(cfg, model, tokenizer)
    fingerprint = tokens_fingerprint((e.prompt_ids, *e.response_ids) for e in seen["examples"])
    return {**probe.finish(), "tokens_fingerprint": fingerprint}


CONTENDERS = {
    "trl_defaults": lambda spec: run_trl(spec, "defaults"),
    "trl_fastest": lambda spec: run_trl(spec, "fastest"),
    "trl_fastest_bf16": lambda spec: run_trl(spec, "fastest_bf16"),
    "alignkit_fp32": lambda spec: run_alignkit(spec, "fp32"),
    "alignkit_bf16": lambda spec: run_alignkit(spec, "bf16"),
    "alignkit_fp32_gc": lambda spec: run_alignkit(spec, "fp32", gradient_checkpointing=True),
    "alignkit_fp32_selective": lambda spec: run_alignkit(spec, "fp32", selective_recompute=True),
    "alignkit_fp32_no_release": lambda spec: run_alignkit(spec, "fp32", release_memory=False),
    "alignkit_fp32_gc_no_release": lambda spec: run_alignkit(spec, "fp32", gradient_checkpointing=True,
                                                             release_memory=False),
    "alignkit_fp32_gc_planned4": lambda spec: run_alignkit(spec, "fp32", gradient_checkpointing=True, max_memory_gb=4.0),
}


# ----------------------------------------------------------------------------------------------------------------
# Loss equality: both tools' DPO loss on the same batches, with a reference that differs from the policy.


def perturbed_copy(model, seed: int, scale: float):
    """The policy for the check: every weight w + scale * std(w) * N(0, 1), noise from a fixed seed."""
    import copy

    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.add_(noise * scale * param.float().std().clamp_min(1e-3))
    return policy


@torch.no_grad()
def run_loss_check(spec: dict) -> dict:
    """reference = the shared initial model, policy = that model perturbed; for every batch of the benchmark's
    data, alignkit's packed DPO loss vs TRL's DPOTrainer.compute_loss (fp32). Reports max |difference| of the
    batch losses and of the per-sequence log-probs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignkit.config import TrainConfig
    from alignkit.data import ExampleSettings, prepare_examples
    from alignkit.losses import build_options, get_loss
    from alignkit.train.method import Method
    from alignkit.train.packing import Packing
    from alignkit.train.reference import Reference, score_examples

    reference, tokenizer = load_model(spec["model"])
    policy = perturbed_copy(reference, seed=spec.get("perturb_seed", 7), scale=spec.get("perturb_scale", 0.05))
    reference.eval()
    policy.eval()
    pairs = spec["pairs_per_step"]
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    n_batches = len(records) // pairs

    # alignkit
    cfg = TrainConfig(model=spec["model"], max_length=spec["max_length"], loss_options={"beta": spec["beta"]})
    lossspec = get_loss("dpo")
    opts = build_options(lossspec, {"beta": spec["beta"]})
    examples = prepare_examples(records, tokenizer, ExampleSettings("pairs", spec["max_length"]))
    packing = Packing.from_config(cfg, tokenizer)
    ref = Reference(*score_examples(reference, examples, packing))
    alignkit_losses, alignkit_logps = [], []
    for b in range(n_batches):
        indices = list(range(b * pairs, (b + 1) * pairs))
        batch = packing.pack([examples[i] for i in indices], indices)
        losses, metrics = Method(lossspec, opts).forward(policy, batch, examples, ref)
        alignkit_losses.append(float(losses.mean()))
        alignkit_logps.append(torch.stack([metrics["logps/chosen"], metrics["logps/rejected"]], 1))

    # TRL, same policy and reference objects
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_check_"), per_device_train_batch_size=pairs,
                     max_length=spec["max_length"], beta=spec["beta"], bf16=False, use_cpu=True,
                     gradient_checkpointing=False, report_to="none", disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer)
    trainer.model.eval()
    data = trainer.train_dataset
    trl_losses, trl_logps = [], []
    for b in range(n_batches):
        inputs = trainer.data_collator([data[i] for i in range(b * pairs, (b + 1) * pairs)])
        trl_losses.append(float(trainer.compute_loss(trainer.model, inputs)))
        # the same policy log-probs TRL's loss used, for a per-sequence comparison
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        out = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                            fused_lm_head=True, use_cache=False)
        seq = out.log_probs.sum(1)
        trl_logps.append(torch.stack(seq.chunk(2), 1))

    loss_diff = [abs(a - t) for a, t in zip(alignkit_losses, trl_losses)]
    logp_diff = float(max((a - t).abs().max() for a, t in zip(alignkit_logps, trl_logps)))
    return {"alignkit_losses": alignkit_losses, "trl_losses": trl_losses, "max_abs_loss_diff": max(loss_diff),
            "max_abs_seq_logp_diff": logp_diff, "perturb_scale": spec.get("perturb_scale", 0.05),
            "batches": n_batches}
