"""A trained reward model as a Reward: (prompt, response) texts -> scalar scores, through the same template,
tokenisation and packed scoring as training. Used by best-of-n, decoding-time search and online RL."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignkit.data.load import load_records
from alignkit.data.tokenize import ExampleSettings, TokenizedExample, tokenize_record, tokenize_records
from alignkit.losses.base import pair_reward_metrics
from alignkit.models.inference import eval_mode
from alignkit.models.reward import load_reward_model, prepare_reward_examples, sequence_rewards
from alignkit.rewards.base import Reward
from alignkit.train.packing import Packing, pad_token_id


class RewardModelScorer(Reward):
    """Scores with a sequence-classification reward model saved in HF format (e.g. `alignkit rm`'s final/).

    max_length: tokens of prompt + response (prompts keep their end, responses their start, as in training).
    packing: the token budget of one packed forward pass and of one of its rows (the dense attention mask costs row
    length squared); default: 8192 tokens in rows of at most 1024, with the tokenizer's pad id.
    """

    def __init__(self, model_dir: str, max_length: int = 1024, packing: Packing | None = None,
                 name: str = "reward_model"):
        model, tokenizer = load_reward_model(model_dir)
        self._setup(model, tokenizer, max_length, packing, name)

    @classmethod
    def from_model(cls, model, tokenizer, max_length: int = 1024, packing: Packing | None = None,
                   name: str = "reward_model") -> RewardModelScorer:
        """A scorer around an already loaded model (e.g. TrainResult.model)."""
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, max_length, packing, name)
        return scorer

    def _setup(self, model, tokenizer, max_length, packing, name):
        self.model, self.tokenizer, self.max_length, self.name = model, tokenizer, max_length, name
        self.packing = packing if packing is not None else Packing(8192, 1024, pad_token_id(tokenizer))

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        if not responses:
            return []
        examples = [tokenize_record(self.tokenizer, {"prompt": p, "completion": r}, "sft", self.max_length)
                    for p, r in zip(prompts, responses)]
        return self.score_examples(examples)[:, 0].tolist()

    @torch.no_grad()
    def score_examples(self, examples: list[TokenizedExample]) -> torch.Tensor:
        """[n, k] rewards of tokenised examples (k responses each), without gradients, in eval mode."""
        examples = prepare_reward_examples(self.model, self.tokenizer, examples, self.max_length)
        rewards = torch.zeros(len(examples), len(examples[0].response_ids))
        with eval_mode(self.model):
            for indices in self.packing.batches(examples):
                batch = self.packing.pack([examples[i] for i in indices], indices)
                rewards[indices] = sequence_rewards(self.model, batch).float().cpu()
        return rewards


def pair_accuracy(scorer: RewardModelScorer, source, on_bad_record: str = "error") -> dict[str, float]:
    """Held-out metrics of a reward model on preference pairs (a path, dataset or list of records): accuracy
    (chosen scored higher; a tie counts half), mean margin r_c - r_r, mean rewards, and the pair count."""
    records = load_records(source, shape="pairs", on_bad_record=on_bad_record)
    settings = ExampleSettings("pairs", scorer.max_length, on_bad_record=on_bad_record)
    examples = tokenize_records(scorer.tokenizer, records, settings)
    rewards = scorer.score_examples(examples)
    metrics = pair_reward_metrics(rewards[:, 0], rewards[:, 1])
    return {
        "accuracy": float(metrics["rewards/accuracy"].mean()),
        "margin": float(metrics["rewards/margins"].mean()),
        "chosen_reward": float(rewards[:, 0].mean()),
        "rejected_reward": float(rewards[:, 1].mean()),
        "pairs": len(examples),
    }
