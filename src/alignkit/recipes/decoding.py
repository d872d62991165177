"""`alignkit generate`, `alignkit decode` and `alignkit synth`: sampling, decoding-time alignment and synthetic
data from the command line. Each reads a prompts JSONL (validated: a bad row is a DataError naming file, row and
field) and writes JSONL atomically; `decode` also writes <out>.summary.json with the compute accounting."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from alignkit.config import SamplingOptions, Strict, load_command_config, make_config, render_help
from alignkit.data.load import load_records, write_jsonl_atomic
from alignkit.errors import ConfigError
from alignkit.generate.presets import apply_preset
from alignkit.generate.realign import RealignOptions, realigned_engine
from alignkit.generate.sample import sample

log = logging.getLogger("alignkit.decode")


class _Sampled(Strict):
    """What generate / decode / synth share: the `sampling:` section, the seed, the output directory."""

    sampling: SamplingOptions = Field(default_factory=SamplingOptions, description="how responses are sampled")
    seed: int = 0
    output_dir: str = Field(description="where the command writes (see the command's own line)")


class GenerateConfig(_Sampled):
    model: str = Field(description="model directory, alias or hub id")
    prompts: str = Field(description="JSONL of {'prompt': ...} (other fields are carried to the output)")
    output_dir: str = Field(description="writes samples.jsonl: each prompt record + 'responses' (+ 'completion' "
                                        "when num_samples = 1)")
    num_samples: int = Field(1, gt=0)
    on_bad_record: Literal["error", "skip"] = "error"
    realign: RealignOptions | None = Field(None, description="DeRa: {reference: DIR, lambda: x}, sample from "
                                                             "softmax(x z_model + (1 - x) z_reference)")
    preset: Literal["urial"] | None = Field(None, description="urial: each prompt wrapped in URIAL's system text and "
                                                              "three examples (plain text, for a base model)")

    @model_validator(mode="before")
    @classmethod
    def _backend_is_engine(cls, values: Any) -> Any:
        """`backend` (before sampling.engine named the engine here too): vllm is engine vllm; hf and auto meant
        "not vLLM", with the engine sampling.engine chose, which is what engine auto does now."""
        if isinstance(values, dict) and "backend" in values:
            values = dict(values)
            backend = values.pop("backend")
            log.info("config key 'backend' is now 'sampling.engine' (the old name still works: %r is engine %r)",
                     backend, "vllm" if backend == "vllm" else "as sampling.engine says")
            if backend == "vllm":
                values["sampling"] = {**(values.get("sampling") or {}), "engine": "vllm"}
        return values


class DecodeConfig(_Sampled):
    method: Literal["sample", "bon", "bon-calibrated", "bonbon", "args", "deal", "tq"]
    model: str = Field(description="the policy (for tq: the base / reference model)")
    prompts: str = Field(description="JSONL of {'prompt': ...}")
    output_dir: str = Field(description="writes decoded.jsonl (bonbon: pairs.jsonl) and summary.json")
    reward: str = "synthetic"
    aggregate: Literal["last", "min", "prod"] | None = Field(None, description="with reward prm:DIR: how step "
                                                             "scores make a response's (default last)")
    weighted: bool = Field(False, description="bon: weighted best-of-n, the answer whose candidates' rewards sum "
                                              "highest (answers read as the math reward reads them)")
    num_samples: int = Field(8, gt=0, description="bon / bon-calibrated / bonbon: samples per prompt")
    num_reference: int = Field(16, gt=0, description="bon-calibrated: reference samples per prompt")
    reference_model: str | None = Field(None, description="bon-calibrated: reference policy (default: model)")
    tie_weight: float = Field(0.5, ge=0, le=1)
    min_gap: float = Field(0.0, ge=0, description="bonbon: smallest best-worst reward gap kept")
    search_top_k: int = Field(10, gt=0, description="args / deal / tq: candidate tokens per step")
    weight: float = Field(1.0, description="args / deal / tq: reward (or value) weight")
    mode: Literal["greedy", "sample"] = "greedy"
    search_temperature: float = Field(0.7, gt=0, description="args / tq with mode sample")
    beams: int = Field(2, gt=0)
    lookahead: int = Field(4, ge=0)
    aligned: str | None = Field(None, description="tq: the aligned baseline model")
    value: Literal["implicit", "reward"] = "implicit"
    beta: float = Field(1.0, gt=0, description="tq: scale of the implicit reward")
    baseline: bool = Field(True, description="also sample plainly and report gain per extra compute")
    on_bad_record: Literal["error", "skip"] = "error"
    realign: RealignOptions | None = Field(None, description="DeRa (methods sample, bon, bonbon): {reference: DIR, "
                                                             "lambda: x}, candidates sampled from the realigned model")


class SynthConfig(_Sampled):
    method: Literal["magpie", "self-instruct", "principles"]
    model: str = Field(description="an instruct model with a chat template (magpie), or any model")
    output_dir: str = Field(description="writes data.jsonl: prompts / sft / pairs records")
    num_prompts: int = Field(100, gt=0, description="prompts to make (magpie / self-instruct)")
    shape: Literal["prompts", "sft", "pairs"] = "prompts"
    reward: str | None = Field(None, description="orders responses into pairs")
    num_responses: int = Field(4, ge=2)
    seeds: str | None = Field(None, description="self-instruct: prompts JSONL of seed tasks")
    prompts: str | None = Field(None, description="principles: prompts JSONL to answer")
    principles: list[str] = Field(default_factory=list)
    contrast_principles: list[str] = Field(default_factory=list)
    system: str | None = None


def _config(cls, config, overrides):
    return load_command_config(cls, config, overrides)


def _prompt_records(path: str, on_bad_record: str = "error") -> list[dict]:
    return load_records(path, shape="prompts", on_bad_record=on_bad_record)


def _carry(record: dict) -> dict:
    """A record's own fields, without the loader's bookkeeping."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def run_generate(config=None, overrides: dict[str, Any] | None = None) -> Path:
    cfg: GenerateConfig = _config(GenerateConfig, config, overrides)
    records = _prompt_records(cfg.prompts, cfg.on_bad_record)  # validate before loading a model
    from alignkit.generate.vllm_backend import load_generator

    # vLLM only when named (engine auto: the fast engine where it runs, else HF generate, as in every command)
    model, tokenizer = load_generator(cfg.model, "vllm" if cfg.sampling.engine == "vllm" else "hf")
    model = _realigned(cfg, model, tokenizer)
    prompts, sampling = [r["prompt"] for r in records], cfg.sampling
    if cfg.preset:
        prompts, sampling = apply_preset(cfg.preset, prompts, sampling)
    samples = sample(model, tokenizer, prompts, sampling, cfg.num_samples, cfg.seed)
    rows = [{**_carry(r), "responses": s, **({"completion": s[0]} if cfg.num_samples == 1 else {})}
            for r, s in zip(records, samples)]
    out = Path(cfg.output_dir) / "samples.jsonl"
    write_jsonl_atomic(out, rows)
    log.info("wrote %d prompts x %d samples to %s", len(rows), cfg.num_samples, out)
    return out


def run_decode(config=None, overrides: dict[str, Any] | None = None) -> dict:
    cfg: DecodeConfig = _config(DecodeConfig, config, overrides)
    prompts = [r["prompt"] for r in _prompt_records(cfg.prompts, cfg.on_bad_record)]
    from alignkit.models.resolve import load_model_and_tokenizer
    from alignkit.rewards.spec import load_reward

    reward = load_reward(cfg.reward, aggregate=cfg.aggregate)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    if cfg.realign and cfg.method not in REALIGNED_METHODS:
        raise ConfigError("realign", f"method {cfg.method} decodes token by token with the model itself; realign "
                                     f"works with {', '.join(REALIGNED_METHODS)}")
    model = _realigned(cfg, model, tokenizer)
    result, extra = decode_with(cfg, model, tokenizer, prompts, reward)
    summary = {**result.summary(), **extra}
    if cfg.baseline and cfg.method != "sample":
        from alignkit.decode.base import efficiency
        from alignkit.decode.bon import plain_sampling

        summary["efficiency"] = efficiency(result, plain_sampling(model, tokenizer, prompts, reward,
                                                                  cfg.sampling, cfg.seed))
    out_dir = Path(cfg.output_dir)
    out = out_dir / ("pairs.jsonl" if cfg.method == "bonbon" else "decoded.jsonl")
    if cfg.method == "bonbon":
        write_jsonl_atomic(out, extra.pop("pairs"))
        summary.pop("pairs", None)
    else:
        write_jsonl_atomic(out, result.records())
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    line = f"{cfg.method}: mean reward {summary['mean_reward']:+.4f}, {summary['generated_tokens_per_prompt']:.1f} tokens/prompt"
    if "efficiency" in summary:
        e = summary["efficiency"]
        line += (f" (plain sampling {e['baseline_mean_reward']:+.4f}; x{e['compute_ratio_tokens'] or 0:.1f} tokens, "
                 f"x{e['compute_ratio_reward_calls'] or 0:.1f} reward calls)")
    log.info("%s; wrote %s and %s", line, out, summary_path)
    return summary


REALIGNED_METHODS = ("sample", "bon", "bonbon")


def _realigned(cfg, model, tokenizer):
    """The model, or with cfg.realign an engine sampling the realigned distribution (generate/realign.py)."""
    if cfg.realign is None:
        return model
    return realigned_engine(model, _load_model(cfg.realign.reference), tokenizer, cfg.sampling, cfg.realign.lambda_)


def decoder_options(cfg: DecodeConfig, options: type[BaseModel]) -> BaseModel:
    """A decoder's options from the command's keys, by name (config_keys: fields read from a differently named
    key, e.g. top_k from search_top_k); a field the command has no key for keeps the decoder's default."""
    keys = {**cfg.model_dump(exclude={"sampling"}), "max_new_tokens": cfg.sampling.max_new_tokens,
            "batch_size": cfg.sampling.batch_size}
    renamed = getattr(options, "config_keys", {})
    values = {name: keys[renamed.get(name, name)] for name in options.model_fields if renamed.get(name, name) in keys}
    return make_config(values, options)


def _load_model(path: str):
    from alignkit.models.resolve import load_model_and_tokenizer

    return load_model_and_tokenizer(path)[0]


def _bon(cfg: DecodeConfig, opts, model, tokenizer, prompts: list, reward):
    from alignkit.decode.bon import best_of_n

    if cfg.method == "sample":
        opts = opts.model_copy(update={"num_samples": 1})
    return best_of_n(model, tokenizer, prompts, reward, opts, cfg.sampling), {}


def _calibrated(cfg: DecodeConfig, opts, model, tokenizer, prompts: list, reward):
    from alignkit.decode.calibrated import calibrated_best_of_n

    if cfg.reference_model:
        opts = opts.model_copy(update={"reference": _load_model(cfg.reference_model)})
    return calibrated_best_of_n(model, tokenizer, prompts, reward, opts, cfg.sampling), {}


def _bonbon(cfg: DecodeConfig, opts, model, tokenizer, prompts: list, reward):
    from alignkit.decode.bonbon import bonbon_pairs, recommended_options

    pairs, result = bonbon_pairs(model, tokenizer, prompts, reward, opts, cfg.sampling)
    return result, {"pairs": pairs, "pair_count": len(pairs),
                    "train_with": {"loss": "bonbon", "loss_options": recommended_options(opts.num_samples)}}


def _args(cfg: DecodeConfig, opts, model, tokenizer, prompts: list, reward):
    from alignkit.decode.args import args_decode

    return args_decode(model, tokenizer, prompts, reward, opts), {}


def _deal(cfg: DecodeConfig, opts, model, tokenizer, prompts: list, reward):
    from alignkit.decode.deal import deal_decode

    return deal_decode(model, tokenizer, prompts, reward, opts), {}


def _tq(cfg: DecodeConfig, opts, model, tokenizer, prompts: list, reward):
    from alignkit.decode.tq import tq_decode

    if not cfg.aligned:
        raise ConfigError("aligned", "method tq needs the aligned baseline model (--aligned DIR)")
    return tq_decode(model, tokenizer, prompts, _load_model(cfg.aligned), opts, reward), {}


@dataclass(frozen=True)
class Decoder:
    """A decoding method: its options (module:Class, built from the command's keys) and how it runs; the run gives
    (DecodeResult, extra summary fields)."""

    options: str
    run: Callable


DECODERS: dict[str, Decoder] = {
    "sample": Decoder("alignkit.decode.bon:BoNOptions", _bon),
    "bon": Decoder("alignkit.decode.bon:BoNOptions", _bon),
    "bon-calibrated": Decoder("alignkit.decode.calibrated:CalibratedOptions", _calibrated),
    "bonbon": Decoder("alignkit.decode.bonbon:BonBonPairsOptions", _bonbon),
    "args": Decoder("alignkit.decode.args:ARGSOptions", _args),
    "deal": Decoder("alignkit.decode.deal:DeALOptions", _deal),
    "tq": Decoder("alignkit.decode.tq:TQOptions", _tq),
}


def decode_with(cfg: DecodeConfig, model, tokenizer, prompts: list, reward):
    """(DecodeResult, extra summary fields) of the configured method."""
    import importlib

    decoder = DECODERS[cfg.method]
    module, _, name = decoder.options.partition(":")
    opts = decoder_options(cfg, getattr(importlib.import_module(module), name))
    return decoder.run(cfg, opts, model, tokenizer, prompts, reward)


def run_synth(config=None, overrides: dict[str, Any] | None = None) -> Path:
    cfg: SynthConfig = _config(SynthConfig, config, overrides)
    from alignkit.generate import synth
    from alignkit.models.resolve import load_model_and_tokenizer
    from alignkit.rewards.spec import load_reward

    if cfg.shape == "pairs" and cfg.reward is None and not (cfg.method == "principles" and cfg.contrast_principles):
        raise ConfigError("reward", "shape pairs needs a reward to order the responses")
    reward = load_reward(cfg.reward) if cfg.reward else None
    seeds = [r["prompt"] for r in _prompt_records(cfg.seeds)] if cfg.seeds else None
    questions = [r["prompt"] for r in _prompt_records(cfg.prompts)] if cfg.prompts else None
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    sampling = cfg.sampling
    if cfg.method == "principles":
        if not questions or not cfg.principles:
            raise ConfigError("principles", "method principles needs --prompts FILE and --principles '[...]'")
        principles = synth.Principles(cfg.principles, cfg.contrast_principles or None, cfg.seed)
        records = synth.principle_driven(model, tokenizer, questions, principles, sampling, reward)
    else:
        if cfg.method == "magpie":
            records = synth.magpie_prompts(model, tokenizer, cfg.num_prompts, sampling, synth.MagpieOptions(system=cfg.system, seed=cfg.seed))
        else:
            if not seeds:
                raise ConfigError("seeds", "method self-instruct needs --seeds FILE (prompts JSONL of seed tasks)")
            options = synth.SelfInstructOptions(seed=cfg.seed)
            records = synth.self_instruct_prompts(model, tokenizer, seeds, cfg.num_prompts, sampling, options)
        if cfg.shape != "prompts":
            pairs = synth.PairOptions(reward, cfg.num_responses, seed=cfg.seed)
            records = synth.respond(model, tokenizer, records, cfg.shape, None, pairs)
    out = Path(cfg.output_dir) / "data.jsonl"
    write_jsonl_atomic(out, records)
    log.info("wrote %d %s records (%s) to %s", len(records), cfg.shape, cfg.method, out)
    return out


def command_help(command: str) -> str:
    """The keys of generate / decode / synth / eval with their defaults and descriptions."""
    from alignkit.eval.evaluate import EvalConfig

    cls = {"generate": GenerateConfig, "decode": DecodeConfig, "synth": SynthConfig, "eval": EvalConfig}[command]
    return render_help(cls, f"alignkit {command} [--config cfg.yaml] [--key value ...]",
                       ["sampling keys may also be given at the top level (--temperature 0.7)."])
