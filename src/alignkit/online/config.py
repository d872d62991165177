"""`alignkit online`'s config: the shared optimisation keys (config.OptimConfig: the same step as offline), the
shared `sampling:` section, and what a round needs (prompts, reward, samples per prompt, the method's options)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field

from alignkit.config import DataSource, OptimConfig, SamplingOptions, Strict, load_command_config, render_help
from alignkit.errors import ConfigError
from alignkit.losses import build_options, get_loss, loss_option_names
from alignkit.losses.offpolicy import OffPolicyOptions
from alignkit.online.methods import ONLINE_METHODS


class AsyncOptions(Strict):
    """Async rollouts (docs/online.md, "Async rollouts"): round r is sampled with the weights of version
    max(0, r - max_staleness) (version v: the policy after v rounds) while the learner trains the rounds before it."""

    max_staleness: int = Field(1, ge=0, description="how many weight versions the rollouts run ahead of the learner "
                               "at most; 0: the synchronous run")
    partial: bool = Field(False, description="partial rollouts: each round sampled in max_staleness segments of "
                          "tokens (with an environment: of turns), segment j of round r by version max(0, r - N + j), "
                          "so a response keeps its prefix across a weight push and its later tokens come from newer "
                          "weights (needs max_staleness >= 2)")


class RayOptions(Strict):
    """Rollout workers on Ray (docs/distributed.md, "Ray"): each worker samples its share of every generate call with
    its own engine; the learner stays in the driver."""

    rollout_workers: int = Field(1, ge=0, description="Ray actors that sample, one placement-group bundle each (with "
                                 "learners >= 2: per learner rank, for its share); 0: the learners sample themselves")
    learners: int = Field(1, ge=1, description="learner ranks; >= 2: Ray actors forming a torch.distributed group "
                          "(the `distributed` step, as under torchrun), each sampling its share itself")
    num_cpus_per_learner: float = Field(1, gt=0, description="CPUs in each learner rank's bundle (and its threads)")
    num_gpus_per_learner: float = Field(0, ge=0, description="GPUs in each learner rank's bundle")
    address: str | None = Field(None, description="null: start Ray on this machine; auto: join the cluster `ray "
                                "start` made; ray://host:10001: Ray Client")
    num_cpus_per_worker: float = Field(1, gt=0, description="CPUs in each worker's bundle (and its torch threads)")
    num_gpus_per_worker: float | None = Field(None, ge=0, description="GPUs in each bundle (default: 1 with "
                                              "sampling.engine vllm, else 0)")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray's placement-group strategy for the workers' bundles")
    max_restarts: int = Field(3, ge=0, description="restarts of a worker that dies (its prompts are redone)")
    placement_timeout_s: float = Field(120, gt=0, description="how long to wait for the cluster to fit the bundles")


class OnlineConfig(OptimConfig):
    method: Literal[tuple(ONLINE_METHODS)]
    model: str = Field(description="the starting policy (usually SFT'd): alias, HF hub id or local directory")
    prompts: str | DataSource = Field(description="prompt records (a `prompt` per row; any data source: file, folder, "
                                      "glob, save_to_disk folder, hub id), cycled through in seeded order")
    eval_prompts: str | DataSource | None = Field(None, description="held-out prompts for summary.json (default: 64 "
                                                  "of prompts)")
    reward: str = Field("synthetic", description="reward spec (rewards/spec.py); self-reward reports it only")
    output_dir: str = "runs/online"
    rounds: int = Field(20, gt=0, description="rollout + learner iterations")
    prompts_per_round: int = Field(16, gt=0, description="under torchrun: split evenly over the ranks")
    num_samples: int = Field(4, ge=2, description="samples per prompt (k; GRPO's G)")
    # Temperature 1, no top-p / top-k by default. The learner scores at the sampling temperature (logits / T, as
    # TRL); top-k / top-p are the engine's alone (docs/online.md: the gap they leave).
    sampling: SamplingOptions = Field(default_factory=SamplingOptions, description="how rollouts are sampled")
    max_length: int = Field(1024, gt=1, description="max tokens of prompt + response when tokenising samples")
    missing_eos_penalty: float | None = Field(None, description="subtracted from the reward of samples cut short")
    mask_truncated: bool = Field(False, description="samples cut at max_new_tokens carry no loss (they still count in "
                                 "their group's reward statistics; TRL's mask_truncated_completions); token-level "
                                 "losses (grpo, ppo)")
    dynamic_sampling: bool | None = Field(None, description="drop groups whose rewards all tie and refill the round "
                                          "with fresh prompts (DAPO; default: the method's: on for dapo)")
    max_refills: int = Field(3, ge=0, description="dynamic sampling: extra rollouts per round at most; the round "
                             "trains on the groups kept so far when they run out")
    overlong_cache: int = Field(0, ge=0, description="DAPO's soft overlong punishment: a penalty rising from 0 to "
                                "overlong_penalty over the last overlong_cache tokens before max_new_tokens; 0: off")
    overlong_penalty: float = Field(1.0, ge=0, description="the punishment at max_new_tokens (DAPO: 1)")
    # The learner: the shared step's keys (learning_rate, lr_schedule, warmup_steps, ...) plus these.
    learning_rate: float = Field(1e-6, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "constant", description="over rounds x num_iterations x minibatches optimizer steps")
    value_learning_rate: float | None = Field(None, gt=0, description="ppo: the value head's (default learning_rate)")
    num_iterations: int = Field(1, gt=0, description="passes over each rollout (PPO epochs; TRL's num_iterations)")
    minibatches: int = Field(1, gt=0, description="optimizer steps per pass")
    loss: str | None = Field(None, description="online-dpo / self-reward: the pairwise loss (dpo; cream with consistency)")
    loss_options: dict[str, Any] = Field(default_factory=dict, description="options of the method's loss; each may "
                                         "also be given at the top level (--kl_coef 0.1)")
    # Reference and pairs.
    pairs: Literal["best-worst", "all"] = Field("best-worst", description="online-dpo / self-reward pairs per prompt")
    ref_update_every: int | None = Field(None, ge=0, description="rounds between reference <- policy; 0: never "
                                         "(default: 1 for self-reward, else 0)")
    apo_alpha: float = Field(0.0, ge=0, description="APO momentum: reference extrapolated from the previous round's")
    # Self-reward.
    judge: str = Field("self", description="self: the policy judges (LLM-as-judge prompt); else a reward spec")
    judge_samples: int = Field(3, gt=0, description="judgements averaged per sample")
    judge_max_new_tokens: int = Field(128, gt=0)
    consistency: Literal["none", "kendall", "toporder"] = Field("none", description="CREAM weights (loss cream)")
    # Environments (alignkit.envs, docs/environments.md): multi-turn rollouts.
    environment: str | dict[str, str] | None = Field(
        None, description="module:attr (a TRL environment_factory class, an alignkit environment or a list of tool "
        "functions), skyrl:<id>, or {name: either} routed by each record's `environment` field: each sample becomes "
        "a conversation with the environment, and the loss falls on the assistant tokens only, on every segment of a "
        "conversation that forked (GRPO family, RLOO, REINFORCE++; PPO, whose GAE runs over the assistant tokens)")
    max_turns: int = Field(4, gt=0, description="environment: assistant turns per conversation at most")
    environment_reward: Literal["final", "sum"] = Field("final", description="environment: a conversation's reward, "
                                                        "its last turn's or the sum of its turns'; where the "
                                                        "environment gives none, `reward` scores the last answer")
    env_workers: int = Field(16, ge=1, description="environment: environments reset and stepped at once (threads; a "
                             "tool call mostly waits on I/O); the conversations are those of 1, the sequential run")
    turn_credit: Literal["conversation", "per_turn"] = Field(
        "conversation", description="environment: conversation: every assistant token takes its conversation's "
        "advantage; per_turn: each assistant turn's tokens take the advantage of that turn's return (its reward and "
        "the later turns'), normalised over the group's conversations at the same turn index (docs/environments.md; "
        "grpo, dapo, gspo, cispo, reinforce++; needs environment_reward: sum)")
    # Distillation (docs/distillation.md): methods opd, gkd and uld.
    teacher: str | None = Field(None, description="opd / gkd / uld: the frozen teacher (alias, directory or hub id) "
                                "with the student's vocabulary (uld: any, with teacher_tokenizer own); it may be larger")
    teacher_tokenizer: Literal["shared", "own"] = Field("shared", description="own: the teacher keeps its own "
                                                        "tokenizer and vocabulary (method uld)")
    lmbda: float = Field(1.0, ge=0, le=1, description="gkd: the share of rounds the student samples (GKD's lambda); "
                         "the others are the teacher's samples (seq_kd) or the prompt records' completions")
    seq_kd: bool = Field(False, description="gkd: rounds the student does not sample are the teacher's samples; "
                         "false: the `completion` of each prompt record (online/mixing.py)")
    teacher_cache: str | None = Field(None, description="gkd with lmbda < 1 without seq_kd, and loss_options.top_k: "
                                      "a directory for the teacher's top-k of the records' completions, built once and "
                                      "read by the dataset rounds (train/teacher_cache.py)")
    async_rollouts: AsyncOptions | None = Field(
        None, validation_alias=AliasChoices("async", "async_rollouts"), description="key `async`: {max_staleness: N}"
        " samples the next rounds on a background thread while the learner trains (tool calls and rewards overlap "
        "learning); GRPO family, REINFORCE++, RLOO, PPO, opd; one process, torchrun or a Ray learner group")
    ray: RayOptions | None = Field(None, description="{rollout_workers: N, address: auto, ...}: sample on Ray "
                                   "actors (fast or vllm engine); absent: in this process")
    # Report.
    eval_before_after: bool = Field(True, description="sample the held-out prompts before and after for "
                                    "summary.json (off where a recipe runs its own evaluation)")
    eval_samples: int = Field(4, gt=0, description="samples per held-out prompt for summary.json")

    @property
    def updates_per_round(self) -> int:
        return self.num_iterations * self.minibatches

    @property
    def reference_every(self) -> int:
        if self.ref_update_every is not None:
            return self.ref_update_every
        return ONLINE_METHODS[self.method].reference_every

    @property
    def dynamic(self) -> bool:
        return ONLINE_METHODS[self.method].dynamic_sampling if self.dynamic_sampling is None else self.dynamic_sampling

    @property
    def loss_name(self) -> str:
        return loss_name_of(self.method, self.loss, self.consistency)


def loss_name_of(method: str, loss: str | None, consistency: str) -> str:
    """The loss a method trains with: its own, or for pair methods `loss` (default dpo; cream with consistency)."""
    entry = ONLINE_METHODS[method]
    if entry.pairs:
        return loss or ("cream" if consistency != "none" else entry.loss)
    return entry.loss


def method_loss(cfg: OnlineConfig):
    """(LossSpec, options) of the method, with the checks of what a method can be combined with."""
    method, name = ONLINE_METHODS[cfg.method], cfg.loss_name
    spec = get_loss(name)
    if method.pairs and (spec.data_shape != "pairs" or spec.output != "logps" or spec.needs_token_logps):
        raise ConfigError("loss", f"{cfg.method} trains with a pairwise loss on sequence log-probs (dpo, ipo, cream, "
                          f"...), not '{name}'")
    if not method.pairs and cfg.loss not in (None, name):
        raise ConfigError("loss", f"method {cfg.method} trains with its own loss '{name}'; leave loss unset")
    if cfg.consistency != "none" and name != "cream":
        raise ConfigError("consistency", f"consistency weights are read by the cream loss only, not '{name}'")
    if (cfg.apo_alpha > 0 or cfg.consistency != "none") and cfg.reference_every == 0:
        raise ConfigError("ref_update_every", "apo_alpha and consistency compare consecutive rounds' models: set >= 1")
    if not method.self_judge and cfg.consistency != "none":
        raise ConfigError("consistency", "CREAM consistency applies to method self-reward")
    if cfg.mask_truncated and (method.pairs or not spec.needs_token_logps):
        raise ConfigError("mask_truncated", f"masks tokens of a token-level loss (grpo, ppo), not '{name}'")
    if cfg.environment is not None and (method.pairs or method.self_judge):
        raise ConfigError("environment", f"multi-turn environments train the GRPO family, RLOO, REINFORCE++ and "
                                         f"PPO, not {cfg.method}: preference pairs of conversations (their environment "
                                         f"tokens, their forked segments) are not built; use grpo, rloo, reinforce++ "
                                         f"or ppo")
    if cfg.environment is not None and cfg.overlong_cache:
        raise ConfigError("overlong_cache", "shapes a single answer's length against sampling.max_new_tokens; a "
                                            "conversation's budget is max_length (a conversation cut by it counts as "
                                            "cut: missing_eos_penalty, mask_truncated)")
    check_turn_credit(cfg, method)
    if (cfg.lmbda < 1 or cfg.seq_kd) and cfg.method != "gkd":
        raise ConfigError("lmbda" if cfg.lmbda < 1 else "seq_kd", f"GKD's mixing of student and teacher samples: "
                                                                  f"method gkd only, not {cfg.method}")
    if spec.needs_teacher != (cfg.teacher is not None):
        raise ConfigError("teacher", f"method {cfg.method} needs a teacher: a model with the student's vocabulary"
                          if spec.needs_teacher else f"method {cfg.method} has no teacher; leave teacher unset")
    check_uld(cfg)
    check_async(cfg, method, spec)
    check_ray(cfg)
    if cfg.lora is not None and cfg.reference_every:
        raise ConfigError("ref_update_every", "cannot be combined with lora (the reference is the base model with the "
                                              "adapters off); set 0")
    return spec, build_options(spec, cfg.loss_options)


def check_uld(cfg: OnlineConfig) -> None:
    """A teacher with its own tokenizer is method uld's alone, and uld re-tokenises single answers only."""
    if cfg.teacher_tokenizer == "own" and cfg.method != "uld":
        raise ConfigError("teacher_tokenizer", f"method {cfg.method} compares distributions over one vocabulary; a "
                                               "teacher with its own tokenizer needs method uld")
    if cfg.method == "uld" and cfg.environment is not None:
        raise ConfigError("environment", "uld re-tokenises each answer for the teacher; conversations (environment "
                                         "turns, the student's chat template around them) are not: use opd or gkd")


def check_turn_credit(cfg: OnlineConfig, method) -> None:
    """Per-turn credit needs turns (an environment), turn rewards that sum to the conversation's, and a loss that
    takes per-token advantages."""
    if cfg.turn_credit == "conversation":
        return
    if cfg.environment is None:
        raise ConfigError("turn_credit", "per_turn credits the assistant turns of multi-turn conversations: set an "
                                         "environment, or leave turn_credit: conversation")
    if cfg.environment_reward != "sum":
        raise ConfigError("turn_credit", "per_turn credits each turn with its reward and the later turns', so a "
                                         "conversation's reward must be the sum of its turns': set "
                                         "environment_reward: sum")
    if not method.turn_credit:
        raise ConfigError("turn_credit", f"per_turn gives each token its turn's advantage, which {cfg.method} does "
                          f"not take (rloo: one ratio per conversation; ppo: GAE from its value head): use grpo, "
                          f"dapo, gspo, cispo or reinforce++, or turn_credit: conversation")


def check_async(cfg: OnlineConfig, method, spec) -> None:
    """What async rollouts (max_staleness > 0) cannot run with, named before anything is loaded."""
    staleness = cfg.async_rollouts.max_staleness if cfg.async_rollouts is not None else 0
    if cfg.async_rollouts is not None and cfg.async_rollouts.partial:
        check_partial(cfg)
    if staleness == 0:
        return
    if method.pairs or method.self_judge or not issubclass(spec.options, OffPolicyOptions):
        raise ConfigError("async.max_staleness", f"stale samples are corrected with their behaviour log-probs (the "
                          f"losses with engine_correction: GRPO family, REINFORCE++, RLOO, PPO, opd), not "
                          f"{cfg.method}; set 0")
    if cfg.sampling.engine == "hf":
        raise ConfigError("sampling.engine", "async rollouts sample while the learner trains, so the engine needs its "
                                             "own copy of the weights: fast (or auto) or vllm; hf samples from the "
                                             "training model itself")
    if cfg.loss_options.get("engine_correction") == "none":
        raise ConfigError("loss_options.engine_correction", f"none leaves samples up to {staleness} versions stale "
                          "uncorrected (such runs fail to learn, silently); use auto (decoupled) or another mode")


def check_partial(cfg: OnlineConfig) -> None:
    """What partial rollouts cannot run with (yet), named before anything is loaded."""
    refused = [
        ("async.max_staleness", cfg.async_rollouts.max_staleness < 2, "partial rollouts split round r between the "
         "versions r - N .. r - 1, and with max_staleness < 2 there is at most one: set >= 2, or partial false"),
        ("dynamic_sampling", cfg.dynamic, "a refill would be sampled by a later version than the round it fills; "
         "set dynamic_sampling false"),
        ("lmbda", cfg.lmbda < 1, "mixed rounds (teacher or dataset responses) are not sampled by the student's "
         "versions; partial rollouts need lmbda 1"),
    ]
    for key, bad, why in refused:
        if bad:
            raise ConfigError(key, f"async.partial: {why}")


def check_ray(cfg: OnlineConfig) -> None:
    """What Ray rollout workers cannot run with, named before anything is loaded."""
    if cfg.ray is None:
        return
    if cfg.ray.rollout_workers == 0:
        if cfg.ray.learners == 1:
            raise ConfigError("ray.rollout_workers", "0 puts nothing on Ray with one learner: set >= 1, or learners "
                                                     ">= 2")
        return
    if cfg.ray.learners > 1 and cfg.distributed == "fsdp":
        raise ConfigError("distributed", "rollout workers beside a learner group load whole weights, which FSDP2 "
                                         "shards: use ddp, or ray.rollout_workers 0 (each rank samples itself)")
    if cfg.sampling.engine == "hf":
        raise ConfigError("sampling.engine", "Ray workers sample with their own copy of the weights: fast (or auto) "
                                             "or vllm; hf samples from the training model itself")
    if cfg.sampling.engine == "vllm" and cfg.ray.num_gpus_per_worker == 0:
        raise ConfigError("ray.num_gpus_per_worker", "a vllm worker needs a GPU: leave it unset (1) or set > 0")


def _loss_option_names(values: dict) -> set[str]:
    if values.get("method") not in ONLINE_METHODS:
        return set()
    return loss_option_names(loss_name_of(values["method"], values.get("loss"), values.get("consistency", "none")))


def online_config(config=None, overrides: dict[str, Any] | None = None) -> OnlineConfig:
    """The one loader (config.load_command_config), with the method's loss options at the top level."""
    return load_command_config(OnlineConfig, config, overrides, _loss_option_names)


def command_help() -> str:
    methods = "|".join(ONLINE_METHODS)
    notes = ["loss options: those of the method's loss (`alignkit grpo --help`, rloo, ppo, dpo, cream), given as "
             "--loss_options.NAME or just --NAME.",
             "methods: " + ", ".join(f"{n} ({m.paper})" for n, m in ONLINE_METHODS.items())]
    return render_help(OnlineConfig, f"alignkit online --method {methods} [--config cfg.yaml] [--key value ...]", notes)
