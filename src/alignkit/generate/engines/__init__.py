"""Rollout engines: generate(prompt_ids, sampling, num_samples) -> the sampled token ids, each token's log-prob under
the distribution it was sampled from, and why each sample ended; update_weights(model) after every optimizer step;
sleep() (optional) while the learner runs.
`hf` (engines/hf.py) is the reference engine: HF generate on the training model itself; `fast` (engines/fast.py) a
lean decode loop for Llama-family decoders, several times faster on CPU at rollout sizes; `vllm`
(engines/vllm.py) a colocated vllm.LLM for GPUs."""

from alignkit.generate.engines.base import (
    Engine,
    Generation,
    cut_at_stop,
    encode_prompts,
    prompt_texts,
    start_generate,
    stop_index,
    stop_token_ids,
    truncate_at_stop,
)
from alignkit.generate.engines.fast import FastEngine, fast_engine_supports
from alignkit.generate.engines.hf import HFEngine


def make_engine(model, tokenizer, sampling) -> Engine:
    """The engine sampling.engine names for `model`; auto: fast where it runs, else hf."""
    choice = getattr(sampling, "engine", "hf")
    if choice == "vllm":
        from alignkit.generate.engines.vllm import VLLMEngine

        return VLLMEngine.for_model(model, tokenizer)
    if choice == "fast" or choice == "auto" and fast_engine_supports(model):
        return FastEngine(model, tokenizer, getattr(sampling, "engine_precision", "fp32"))
    return HFEngine(model, tokenizer)


def sleep_engine(engine) -> None:
    """Let the engine free what it holds for sampling while the learner runs; the next update_weights wakes it.
    Engines without a sleep (hf samples from the policy itself, a user's own engine) hold nothing extra."""
    sleep = getattr(engine, "sleep", None)
    if sleep is not None:
        sleep()


def as_engine(generator, tokenizer, sampling=None) -> Engine:
    """An engine (anything with generate and update_weights) as it is, or a model in the engine sampling names."""
    return generator if hasattr(generator, "update_weights") else make_engine(generator, tokenizer, sampling)


__all__ = ["Engine", "FastEngine", "Generation", "HFEngine", "as_engine", "cut_at_stop", "encode_prompts",
           "fast_engine_supports", "make_engine", "prompt_texts", "sleep_engine", "start_generate", "stop_index",
           "stop_token_ids", "truncate_at_stop"]
