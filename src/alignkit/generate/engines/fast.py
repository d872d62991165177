"""The fast CPU engine: a lean decode loop for Llama-family decoders (SmolLM2, Llama, Mistral without sliding
window), on the policy's own weights.

What makes it faster than HF generate at rollout sizes (many sequences, short answers, a small model):
- prompts that start alike (a record's k conversations, one system prompt) share their common prefix, prefilled once
  (generate/engines/prefix.py), and each prompt's KV is copied to its k samples;
- a static, pre-allocated KV cache per layer, written in place: no cache objects, no concatenation per step;
- fused QKV and gate/up projections (one GEMM each instead of three and two);
- finished sequences are dropped from the batch, so a round costs what its live samples cost;
- the vocabulary projection and sampling run on the last position only, with one log-softmax per step that gives
  both the sampling distribution and the returned log-probs;
- optional bf16 weights (`dtype: bf16`) on CPUs with AVX512-BF16 / AMX.

Its outputs come from the same model: greedy decoding gives HF's tokens, and the log-probs equal the trainer's
log-softmax on the sampled tokens (fp32: within 1e-4; bf16: see docs/online.md). The fused weights are copies, so
update_weights(model) must follow every optimizer step (the online loop calls it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.errors import ConfigError
from alignkit.generate.engines.base import Generation, stop_token_ids
from alignkit.generate.engines.prefix import Layout, layout
from alignkit.models.inference import whole

SUPPORTED = ("llama", "mistral")


def fast_engine_supports(model) -> bool:
    """Llama-family decoders on the CPU, LoRA adapters on their linear layers included (merged into the engine's
    copy of the weights); a policy on a GPU samples through hf (or vllm)."""
    base = _base(model)
    config = getattr(base, "config", None)
    return (getattr(config, "model_type", None) in SUPPORTED and _adapters_on_linears_only(model)
            and next(model.parameters()).device.type == "cpu"
            and getattr(config, "sliding_window", None) is None and getattr(config, "hidden_act", "silu") == "silu"
            and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False))


def _base(model):
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _adapters_on_linears_only(model) -> bool:
    """peft LoRA on the decoder's linear layers only (an adapted embedding or head is not merged here)."""
    if not hasattr(model, "peft_config"):
        return True
    base = _base(model)
    adapted = {name for name, module in base.named_modules() if hasattr(module, "lora_A")}
    head = {name for name, module in base.named_modules() if module is base.get_output_embeddings()}
    return all(".layers." in name for name in adapted) and not adapted & head


def _weight(linear) -> torch.Tensor:
    """A linear layer's weight with its active LoRA deltas added (peft's get_delta_weight: B A * scaling); the
    policy's own weights are not touched."""
    if not hasattr(linear, "lora_A"):
        return whole(linear.weight)
    weight = linear.get_base_layer().weight
    if getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False):
        return weight
    for name in linear.active_adapters:
        if name in linear.lora_A:
            weight = weight + linear.get_delta_weight(name)
    return weight


class _Layer:
    def __init__(self, layer, dtype):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = torch.cat([_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)]).detach().to(
            dtype, copy=True)
        self.o = _weight(attn.o_proj).detach().to(dtype, copy=True)
        self.gate_up = torch.cat([_weight(mlp.gate_proj), _weight(mlp.up_proj)]).detach().to(dtype, copy=True)
        self.down = _weight(mlp.down_proj).detach().to(dtype, copy=True)
        self.norm1 = whole(layer.input_layernorm.weight).detach().to(dtype, copy=True)
        self.norm2 = whole(layer.post_attention_layernorm.weight).detach().to(dtype, copy=True)


class FastEngine:
    name = "fast"

    @property
    def exact_logprobs(self) -> bool:
        """Whether its log-probs are the trainer's (online runs correct the gap otherwise): in the model's own
        dtype yes (fp32: within 1e-4, tested); bf16 weights no (a mean gap of 0.04 nats on SmolLM2); realigned
        no (they are the mixed distribution's)."""
        return self.dtype is None and self.reference is None

    def __init__(self, model, tokenizer, dtype: str = "fp32", realign=None):
        """realign: (reference model, lambda): sample from softmax(lambda z_policy + (1 - lambda) z_reference),
        the reference decoded beside the policy in the same loop (DeRa, generate/realign.py)."""
        if not fast_engine_supports(model):
            raise ConfigError("sampling.engine", f"the fast engine runs Llama-family decoders on the CPU (LoRA on their "
                                                 f"linear layers), not {type(model).__name__}; use hf (or auto)")
        self.tokenizer, self.dtype = tokenizer, torch.bfloat16 if dtype == "bf16" else None
        self.update_weights(model)
        self.reference, self.realign_lambda = None, None
        if realign is not None:
            self.reference, self.realign_lambda = FastEngine(realign[0], tokenizer, dtype), float(realign[1])

    def sleep(self) -> None:
        """Drop the engine's weight copies while the learner runs (they are rebuilt by the next update_weights, as
        vLLM's sleep mode frees its weights between rollouts): the learner's peak does not carry them."""
        self.layers = self.embed = self.norm = self.head = None

    @torch.no_grad()
    def update_weights(self, model) -> None:
        """Copy the policy's weights (LoRA deltas merged) into the engine's fused layout (one pass over the weights).
        An FSDP2-sharded policy is gathered one parameter at a time as it is copied: every rank calls this at once."""
        model = _base(model)
        config = model.config
        dtype = self.dtype or model.get_output_embeddings().weight.dtype
        decoder = model.model
        self.layers = [_Layer(layer, dtype) for layer in decoder.layers]
        self.embed = whole(decoder.embed_tokens.weight).detach().to(dtype, copy=True)
        self.norm = whole(decoder.norm.weight).detach().to(dtype, copy=True)
        head = model.get_output_embeddings().weight
        # tied (SmolLM2, Qwen2): one copy serves both, as in the policy itself
        self.head = self.embed if head is decoder.embed_tokens.weight else whole(head).detach().to(dtype, copy=True)
        self.rotary = decoder.rotary_emb
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.compute_dtype = dtype
        self.device = self.embed.device

    def _rms(self, x, weight):
        """HF's RMSNorm: normalised in fp32, cast back, then scaled (one fused kernel for the normalisation)."""
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _rope_tables(self, length: int):
        """cos and sin [length, d] for positions 0..length-1, in the compute dtype (HF's rotary, computed once)."""
        cos, sin = self.rotary(self.embed[:1][None], torch.arange(length)[None])
        return cos[0].to(self.compute_dtype), sin[0].to(self.compute_dtype)

    def _forward(self, ids, positions, caches, write_at, key_mask, rope):
        """Hidden states of ids [N, T] at positions [N, T]; writes their K/V into caches at write_at.. (in place)
        and attends over caches[:, :, :write_at + T] under key_mask (bool [N, 1, T, S] for the prefill, an additive
        [N, S] bias when decoding)."""
        N, T = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = rope[0][positions][:, :, None], rope[1][positions][:, :, None]  # [N, T, 1, d]
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        end = write_at + T
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            h = self._rms(x, layer.norm1)
            qkv = (h @ layer.qkv.T).view(N, T, hq + 2 * hk, d)
            qk = qkv[:, :, :hq + hk]  # RoPE on the queries and keys at once
            qk = (qk * cos + _rotate_half(qk) * sin).transpose(1, 2)
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, :, hq + hk:].transpose(1, 2)
            k_cache[:, :, write_at:end] = k
            v_cache[:, :, write_at:end] = v
            attn = self._attend(q, k_cache[:, :, :end], v_cache[:, :, :end], key_mask)
            x = x + attn.transpose(1, 2).reshape(N, T, hq * d) @ layer.o.T
            gate, up = (self._rms(x, layer.norm2) @ layer.gate_up.T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down.T
        return self._rms(x, self.norm)

    def _attend(self, q, k, v, key_mask):
        """Attention of q [N, hq, T, d] over k, v [N, hk, S, d]. One query per row (decoding): plain batched matmuls
        over the query groups with an additive padding bias and an fp32 softmax (CPU SDPA is slow there, in bf16
        most); prefill: SDPA."""
        N, hq, T, d = q.shape
        hk = k.shape[1]
        if key_mask.dim() == 4:  # the prefill's boolean mask (any prompt length, one token included)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=hq != hk)
        grouped = q.reshape(N, hk, hq // hk, d) * d ** -0.5
        scores = torch.matmul(grouped, k.transpose(-1, -2)) + key_mask[:, None, None, :]  # [N, hk, g, S]
        out = torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype), v)  # [N, hk, g, d]
        return out.view(N, hq, 1, d)

    def _logits(self, hiddens):
        """Next-token logits [N, V] from the last hidden states of the policy (and of the reference, realigned)."""
        logits = (hiddens[0] @ self.head.T).float()
        if self.reference is None:
            return logits
        lam = self.realign_lambda
        return lam * logits + (1 - lam) * (hiddens[1] @ self.reference.head.T).float()

    @staticmethod
    def _next(logits, sampling, generator):
        """(tokens [N], their log-probs [N]) from the next-token logits [N, V]: temperature, top-k, top-p as HF
        applies them, one log-softmax for both sampling and the log-prob."""
        if sampling.temperature <= 0:
            logps = torch.log_softmax(logits, -1)
            tokens = logps.argmax(-1)
            return tokens, logps.gather(1, tokens[:, None])[:, 0]
        if sampling.temperature != 1:
            logits = logits / sampling.temperature
        if sampling.top_k:
            kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sampling.top_p < 1:
            sorted_logits, order = logits.sort(-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - sampling.top_p
            drop[:, -1] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        logps = torch.log_softmax(logits, -1)
        # inverse-CDF sampling: one uniform per row (torch.multinomial's exponential race was a sixth of a step)
        cdf = logps.exp().cumsum_(-1)
        u = torch.rand(len(cdf), 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)[:, 0]
        return tokens, logps.gather(1, tokens[:, None])[:, 0]

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling, num_samples: int = 1,
                 seed: int = 0) -> Generation:
        """num_samples samples per prompt, in chunks of sampling.batch_size prompts, each chunk seeded by
        seed + its first prompt's index (so the same prompts give the same samples)."""
        if self.layers is None:
            raise RuntimeError("the fast engine is asleep (its weights were dropped for the learner): call "
                               "update_weights(model) before generate")
        tokenizer = self.tokenizer
        end_ids = stop_token_ids(tokenizer, sampling.stop_strings)
        out = Generation(list(prompt_ids), [], [], [], [], [])
        for start in range(0, len(prompt_ids), sampling.batch_size):
            chunk = prompt_ids[start:start + sampling.batch_size]
            rows, row_logps = self._generate_chunk(chunk, sampling, num_samples, end_ids,
                                                   torch.Generator(self.device).manual_seed(seed + start))
            out.add_rows(tokenizer, rows, row_logps, num_samples, end_ids, sampling.stop_strings)
        return out

    def _prefill(self, plan: Layout, k: int, new: int):
        """(last hidden states [B k, H], static KV caches for B k samples, RoPE tables) after each prompt: each group's
        shared prefix is run once, then each prompt's rest over it (generate/engines/prefix.py), and a prompt's KV is
        copied to its k samples."""
        width, prefix, B = plan.width, plan.prefix_ids.shape[1], len(plan.group)
        rope = self._rope_tables(int(plan.lengths.max()) + new + 1)
        caches = self._empty_caches(B, width + (new if k == 1 else 0))
        if prefix:
            shared = self._empty_caches(len(plan.prefix_ids), prefix)
            self._forward(plan.prefix_ids, plan.prefix_positions, shared, 0, plan.prefix_attention(), rope)
            for (k_cache, v_cache), (k_shared, v_shared) in zip(caches, shared):
                k_cache[:, :, :prefix] = k_shared[plan.group]
                v_cache[:, :, :prefix] = v_shared[plan.group]
        hidden = self._forward(plan.rest_ids, plan.rest_positions, caches, prefix, plan.rest_attention(), rope)[:, -1]
        if k == 1:
            return hidden, caches, rope
        expanded = self._empty_caches(B * k, width + new)
        for (k_cache, v_cache), (k_prompt, v_prompt) in zip(expanded, caches):
            k_cache[:, :, :width] = k_prompt.repeat_interleave(k, 0)
            v_cache[:, :, :width] = v_prompt.repeat_interleave(k, 0)
        return hidden.repeat_interleave(k, 0), expanded, rope

    def _empty_caches(self, rows: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One uninitialised (K, V) pair [rows, kv heads, width, head dim] per layer."""
        shape = (rows, self.kv_heads, width, self.head_dim)
        return [(torch.empty(shape, dtype=self.compute_dtype), torch.empty(shape, dtype=self.compute_dtype))
                for _ in self.layers]

    def _generate_chunk(self, chunk, sampling, k, end_ids, generator):
        new = sampling.max_new_tokens
        plan = layout(chunk, self.device)
        P, N = plan.width, len(chunk) * k
        engines = [self] if self.reference is None else [self, self.reference]
        hiddens, caches, ropes = map(list, zip(*(e._prefill(plan, k, new) for e in engines)))
        # additive attention bias over the cache: -inf on the prompts' padding, 0 elsewhere
        key_bias = torch.zeros(N, P + new, dtype=self.compute_dtype)
        key_bias[:, :P].masked_fill_(~plan.key_mask().repeat_interleave(k, 0), float("-inf"))
        next_position = plan.lengths.repeat_interleave(k, 0)
        live = torch.arange(N)  # the batch's rows, as indices into the chunk's N samples
        done = torch.zeros(N, dtype=torch.bool)  # rows of the batch that have ended (dropped at the next compaction)
        rows: list[list[int]] = [[] for _ in range(N)]
        row_logps: list[list[float]] = [[] for _ in range(N)]
        ends = torch.tensor(end_ids or [-1])
        for t in range(new):
            tokens, logps = self._next(self._logits(hiddens), sampling, generator)
            for i, token, lp, ended in zip(live.tolist(), tokens.tolist(), logps.tolist(), done.tolist()):
                if not ended:
                    rows[i].append(token)
                    row_logps[i].append(lp)
            done |= torch.isin(tokens, ends)
            if t == new - 1 or bool(done.all()):
                break
            if int(done.sum()) * 4 >= len(live):  # a quarter has ended: drop them (copying the caches costs a step)
                keep = ~done
                live, tokens, next_position, done = live[keep], tokens[keep], next_position[keep], done[keep]
                for model_caches in caches:  # layer by layer, so the old and new caches overlap by one layer only
                    for i, (kc, vc) in enumerate(model_caches):
                        model_caches[i] = (kc[keep], vc[keep])
                key_bias = key_bias[keep]
            hiddens = [e._forward(tokens[:, None], next_position[:, None], c, P + t, key_bias[:, :P + t + 1], rope)[:, -1]
                       for e, c, rope in zip(engines, caches, ropes)]
            next_position = next_position + 1
        return rows, row_logps


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
