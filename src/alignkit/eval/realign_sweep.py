"""`alignkit eval --realign_sweep 0,0.5,1,1.5`: DeRa's answer to "which beta should I have trained with?" (arXiv
2402.02992). For each lambda, the answers sampled from softmax(lambda z_aligned + (1 - lambda) z_reference) are
scored: mean reward, KL to the reference and length; lambda stands in for retraining at KL strength beta / lambda."""

from __future__ import annotations

from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.eval.kl import kl_packing, kl_summary
from alignkit.generate.engines import encode_prompts
from alignkit.generate.realign import realigned_engine
from alignkit.train.packing import pad_token_id
from alignkit.train.reference import score_examples


def parse_lambdas(value) -> list[float] | None:
    """A list of numbers, or their comma-separated text ("0,0.5,1" from the command line)."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, (int, float)):
        return [float(value)]
    try:
        lambdas = [float(part) for part in str(value).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers such as 0,0.5,1,1.5, got {value!r}") from None
    if any(not lam >= 0 or lam == float("inf") for lam in lambdas):
        raise ValueError(f"each lambda must be a finite number >= 0, got {value!r}")
    return lambdas


def realign_sweep(policy, reference, tokenizer, prompts: list, reward, cfg) -> list[dict]:
    """One row per lambda of cfg.realign_sweep (sampled with cfg.sampling and cfg.seed): mean reward, KL(pi_lambda || reference) as the mean over answers of sum_t
    log pi_lambda(y_t) - log pi_ref(y_t) (pi_lambda's log-probs are the engine's: unbiased at temperature 1
    without top-k / top-p, as eval's kl), its standard error, mean tokens and words per answer."""
    if policy is None:
        raise ConfigError("realign_sweep", "needs the aligned model itself (--model DIR), not its responses")
    if reference is None:
        raise ConfigError("realign_sweep", "needs the reference to realign with: --reference DIR (or --baseline)")
    prompt_ids = encode_prompts(tokenizer, prompts)
    packing = kl_packing(pad_token_id(tokenizer))
    rows = []
    for lam in cfg.realign_sweep:
        engine = realigned_engine(policy, reference, tokenizer, cfg.sampling, lam)
        generation = engine.generate(prompt_ids, cfg.sampling, 1, cfg.seed)
        texts, ids = [t[0] for t in generation.texts], [s[0] for s in generation.ids]
        rewards = reward(prompts, texts)
        examples = [TokenizedExample(p, [s]) for p, s in zip(prompt_ids, ids)]
        reference_logps = score_examples(reference, examples, packing)[0][:, 0].tolist()
        log_ratios = [sum(lp[0]) - ref for lp, ref in zip(generation.logprobs, reference_logps)]
        rows.append({"lambda": lam, "mean_reward": sum(rewards) / len(rewards), **kl_summary(log_ratios),
                     "tokens": sum(map(len, ids)) / len(ids), "words": sum(len(t.split()) for t in texts) / len(texts)})
    return rows
