"""A vLLM engine behind the same interface as the HF sampler: pass a VLLMSampler where `sample` takes a model.

Used only when vllm is importable and CUDA is available (`vllm_available`); the import is guarded, so alignkit
never needs vllm. NOT exercised by the test suite (no GPU / vllm on the CI machine): treat it as untested."""

from __future__ import annotations

import importlib.util

from alignkit.errors import AlignkitError
from alignkit.generate.sample import Samples, SamplingConfig, prompt_texts, truncate_at_stop


def vllm_available() -> bool:
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class VLLMSampler:
    """Holds a vllm.LLM for a local model directory; `sample_with_counts(engine, tokenizer, ...)` calls it."""

    is_vllm = True

    def __init__(self, model_dir: str, **engine_options):
        if not vllm_available():
            raise AlignkitError("backend 'vllm': needs the vllm package and a CUDA device; use backend 'hf'")
        from vllm import LLM

        self.llm = LLM(model=model_dir, **engine_options)

    def sample(self, tokenizer, prompts: list, cfg: SamplingConfig, num_samples: int) -> Samples:
        from vllm import SamplingParams

        greedy = cfg.temperature <= 0
        params = SamplingParams(
            n=num_samples, temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 and not greedy else -1, max_tokens=cfg.max_new_tokens,
            seed=cfg.seed, stop=list(cfg.stop) or None, skip_special_tokens=True,
        )
        results = self.llm.generate(prompt_texts(tokenizer, prompts), params, use_tqdm=False)
        out = Samples([], [])
        for result in results:
            out.texts.append([truncate_at_stop(o.text, cfg.stop).strip() for o in result.outputs])
            out.num_tokens.append([len(o.token_ids) for o in result.outputs])
        return out


def load_generator(model_dir: str, backend: str = "auto"):
    """(model, tokenizer) for generation: a VLLMSampler when backend is 'vllm', or 'auto' and vllm can run;
    else the HF model. The tokenizer is always the HF one (chat templates and stop tokens)."""
    from alignkit.models.resolve import load_model_and_tokenizer, resolve_model

    if backend not in ("auto", "hf", "vllm"):
        raise AlignkitError(f"backend '{backend}': use auto, hf or vllm")
    if backend == "vllm" or backend == "auto" and vllm_available():
        from transformers import AutoTokenizer

        model_dir = resolve_model(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return VLLMSampler(model_dir), tokenizer
    return load_model_and_tokenizer(model_dir)
