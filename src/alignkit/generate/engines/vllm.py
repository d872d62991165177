"""A colocated vLLM engine for GPUs: a vllm.LLM in the training process, fed token ids, returning the sampled ids
with their log-probs (vLLM's processed log-probs: temperature / top-k / top-p applied) and finish reasons; after every
update the policy's weights are pushed into it (LoRA: merged into the base first). Built with vLLM's sleep mode: while
the learner runs it sleeps at level 2 (weights and KV cache freed) and the push wakes it. vllm is imported only here,
and only when this engine is asked for; the tests drive it with a fake LLM that records the weight pushes."""

from __future__ import annotations

import importlib.util

from alignkit.errors import ConfigError
from alignkit.generate.engines.base import Generation, cut_at_stop, stop_token_ids
from alignkit.models.inference import whole


def vllm_available() -> bool:
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def _colocated_load_weights(llm):
    """vLLM's in-process model (V0/V1 colocated engines), whose load_weights takes (name, tensor) pairs."""
    executor = llm.llm_engine.model_executor
    worker = getattr(executor.driver_worker, "worker", executor.driver_worker)
    return worker.model_runner.model.load_weights


class VLLMEngine:
    name = "vllm"
    exact_logprobs = False  # its kernels (and precision) give log-probs that differ from the trainer's

    def __init__(self, llm, tokenizer, sampling_params=None, load_weights=None, sleep_mode: bool = False):
        """llm: a vllm.LLM (or anything with its generate); sampling_params: vllm.SamplingParams (default);
        load_weights: where weights go (default: the colocated model's load_weights); sleep_mode: the LLM was built
        with enable_sleep_mode=True, so sleep() frees its GPU memory while the learner runs."""
        if sampling_params is None:
            from vllm import SamplingParams as sampling_params
        self.llm, self.tokenizer, self.params = llm, tokenizer, sampling_params
        self.load_weights = load_weights  # found on the first push: an engine that only samples never needs it
        self.sleep_mode, self.asleep = sleep_mode, False

    @classmethod
    def for_model(cls, model, tokenizer, **llm_options):
        """A colocated vllm.LLM on the policy's weights (saved once to a temporary directory to start it)."""
        if not vllm_available():
            raise ConfigError("sampling.engine", "vllm needs the vllm package and a CUDA device; use hf or fast")
        import tempfile

        from vllm import LLM

        path = tempfile.mkdtemp(prefix="alignkit-vllm-")
        merged = _merged(model)
        sharded = any(hasattr(p, "full_tensor") for p in merged.parameters())  # FSDP2: save the gathered weights
        merged.save_pretrained(path, **({"state_dict": _merged_state(merged)} if sharded else {}))
        tokenizer.save_pretrained(path)
        options = {"enable_sleep_mode": True, **llm_options}
        return cls(LLM(model=path, **options), tokenizer, sleep_mode=options["enable_sleep_mode"])

    def sleep(self) -> None:
        """vLLM's level-2 sleep while the round is scored and learned: its weights and KV cache are discarded (the
        weight push that ends the round refills the weights), so the learner has the GPU memory they held."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def update_weights(self, model) -> None:
        """Push every weight of the policy (LoRA adapters merged in; peft's names mapped back to the base's). Asleep:
        only the weights' memory is woken for the push, and the KV cache after it (vLLM's RLHF order: the push
        never holds both at once)."""
        if self.load_weights is None:
            self.load_weights = _colocated_load_weights(self.llm)
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.load_weights(list(_merged_state(model).items()))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def generate(self, prompt_ids: list[list[int]], sampling, num_samples: int = 1,
                 seed: int = 0) -> Generation:
        if self.asleep:
            raise RuntimeError("the vllm engine is asleep (its weights were discarded for the learner): call "
                               "update_weights(model) before generate")
        greedy = sampling.temperature <= 0
        params = self.params(n=num_samples, temperature=0.0 if greedy else sampling.temperature,
                             top_p=1.0 if greedy else sampling.top_p,
                             top_k=sampling.top_k if sampling.top_k > 0 and not greedy else -1,
                             max_tokens=sampling.max_new_tokens, seed=seed, logprobs=0,
                             skip_special_tokens=True)
        results = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
        end_ids = stop_token_ids(self.tokenizer, sampling.stop_strings)
        out = Generation(list(prompt_ids), [], [], [], [], [])
        for result in results:
            for field in (out.ids, out.logprobs, out.finish_reasons, out.texts, out.generated):
                field.append([])
            for sample in result.outputs:
                row = list(sample.token_ids)
                logps = [step[token].logprob for step, token in zip(sample.logprobs, row)]
                ids, text, stopped = cut_at_stop(self.tokenizer, row, end_ids, sampling.stop_strings)
                out.ids[-1].append(ids)
                out.logprobs[-1].append(logps[:len(ids)])
                out.finish_reasons[-1].append("stop" if stopped or sample.finish_reason == "stop" else "length")
                out.texts[-1].append(text)
                out.generated[-1].append(len(row))
        return out


def _merged(model):
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def _merged_state(model) -> dict:
    """The policy's weights as the base model names them; LoRA deltas folded in without touching the policy. An
    FSDP2-sharded policy's are gathered one tensor at a time (every rank pushes at once)."""
    if not hasattr(model, "peft_config"):
        return {name: whole(tensor).detach() for name, tensor in model.state_dict().items()}
    model.merge_adapter()
    try:
        state = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name:
                continue
            state[name.replace("base_model.model.", "", 1).replace(".base_layer", "")] = tensor.detach().clone()
        return state
    finally:
        model.unmerge_adapter()
