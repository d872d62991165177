"""`alignkit generate --backend vllm`: load a model directory straight into the vLLM engine (generate/engines/vllm.py)
instead of an HF model; `sample` takes the engine where it takes a model. Used only when vllm is importable and CUDA
is available; the import is guarded, so alignkit never needs vllm."""

from __future__ import annotations

from alignkit.errors import AlignkitError
from alignkit.generate.engines.vllm import VLLMEngine, vllm_available


def load_generator(model_dir: str, backend: str = "auto"):
    """(model, tokenizer) for generation: a VLLMEngine when backend is 'vllm', or 'auto' and vllm can run;
    else the HF model. The tokenizer is always the HF one (chat templates and stop tokens)."""
    from alignkit.models.resolve import load_model_and_tokenizer, resolve_model

    if backend not in ("auto", "hf", "vllm"):
        raise AlignkitError(f"backend '{backend}': use auto, hf or vllm")
    if backend == "vllm" or backend == "auto" and vllm_available():
        if not vllm_available():
            raise AlignkitError("backend 'vllm': needs the vllm package and a CUDA device; use backend 'hf'")
        from transformers import AutoTokenizer
        from vllm import LLM

        model_dir = resolve_model(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return VLLMEngine(LLM(model=model_dir), tokenizer), tokenizer
    return load_model_and_tokenizer(model_dir)
