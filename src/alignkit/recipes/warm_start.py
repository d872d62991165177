"""The warm starts' SFT before RL, LoRA through the one training loop, merged, so the RL run adds its own adapters on
the warm-started weights (SFTSettings, run_warm_start): the agent job's, on worked conversations (below), and `alignkit
rl`'s, on the model's own passing answers (recipes/raft.py).

The agent job's cold start on demonstrations (DeepSeek-R1, ToolRL, ReTool), for the arithmetic task, whose untrained
model never writes a well-formed tool call: each conversation is played through the environment
(envs/demonstrations.py), so its tokens are exactly those of a rollout that wrote the same replies; the loss falls on
the assistant turns only (the rollout's loss mask)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from alignkit.config import Strict, TrainConfig
from alignkit.data import TokenizedExample
from alignkit.envs.demonstrations import demonstration


class SFTSettings(Strict):
    """The warm start's SFT, whatever its examples (worked conversations here, the model's own passing answers in
    recipes/raft.py)."""

    epochs: int = Field(1, gt=0, description="passes over the examples")
    learning_rate: float = Field(5e-4, gt=0.0, description="the SFT's learning rate (LoRA with the RL run's r and "
                                                           "alpha)")
    examples_per_step: int = Field(4, gt=0, description="examples per optimizer step")


class WarmStart(SFTSettings):
    examples: int = Field(32, ge=0, description="worked conversations, on problems disjoint from the training and "
                                                "held-out records; 0: no warm start")


def as_example(trajectory, row: int) -> TokenizedExample:
    """A played conversation as an SFT example: prompt = the tokens before the first reply, response = the rest,
    trained exactly where the rollout would train (the replies' tokens)."""
    segment = trajectory.segments[0]
    first = segment.loss_mask.index(1)
    return TokenizedExample(segment.ids[:first], [segment.ids[first:]], "<warm start>", row,
                            response_loss_masks=[[bool(m) for m in segment.loss_mask[first:]]])


def demonstration_examples(tokenizer, records: list[dict], make_env, replies, sampling, limits
                           ) -> list[TokenizedExample]:
    """One SFT example per record: the environment (make_env()) with the assistant writing replies(record); each
    conversation must earn reward 1 (a worked solution the environment does not accept is a bug)."""
    examples = []
    for i, record in enumerate(records):
        trajectory = demonstration(tokenizer, make_env(), {**record, "_row": i + 1}, replies(record), sampling,
                                   limits)
        if trajectory.reward != 1.0:
            raise ValueError(f"the worked conversation for warm-start record {i + 1} earned {trajectory.reward}, "
                             "not 1: its replies do not solve the problem")
        examples.append(as_example(trajectory, i + 1))
    return examples


def warm_start_config(settings: SFTSettings, online, examples: list[TokenizedExample], out: Path) -> dict:
    """The SFT run's config: the RL run's model, LoRA shape, precision and seed."""
    longest = max(e.num_tokens for e in examples)
    return {"loss": "sft", "model": online.model, "train_data": str(out / "warm_start.jsonl"),
            "output_dir": str(out / "warm_start"), "learning_rate": settings.learning_rate,
            "epochs": settings.epochs, "max_length": online.max_length, "warmup_steps": 1,
            "max_tokens_per_batch": longest * settings.examples_per_step, "precision": online.precision,
            "lora": online.lora.model_dump() if online.lora is not None else None, "seed": online.seed,
            "progress": False, "save_every": 0}


def run_warm_start(model, tokenizer, examples: list[TokenizedExample], settings: SFTSettings, online, out: Path):
    """SFT of `model` on the examples; the trained model, LoRA merged."""
    from alignkit.train.loop import train

    return train(TrainConfig(**warm_start_config(settings, online, examples, out)), model, tokenizer, examples).model
