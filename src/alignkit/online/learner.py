"""The learner: optimizer updates of any registered loss on a rollout's examples, through the same pieces as offline
training (pack -> response_logprobs -> loss -> backward -> clip -> step). What it adds is the rollout's per-example
tensors (rewards, behaviour and reference log-probs, advantages), gathered into LossInputs for every micro-batch,
and PPO's value head on the policy's last hidden states."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from alignkit.data.pack import PackedBatch, pack, token_budget_batches
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import AlignkitError
from alignkit.losses import LossInputs
from alignkit.models.logprobs import ResponseLogProbs, backbone, response_logprobs
from alignkit.train.guards import nonfinite_reason
from alignkit.train.loop import mean_trained_lengths
from alignkit.train.reference import score_examples


@dataclass
class LearnerConfig:
    learning_rate: float = 1e-6
    value_learning_rate: float | None = None  # PPO's value head; None: learning_rate
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    epochs: int = 1  # passes over each rollout (PPO's ppo_epochs, GRPO's num_iterations)
    minibatches: int = 1  # optimizer steps per pass
    max_tokens_per_batch: int = 4096  # micro-batch budget: a minibatch over it accumulates gradients
    max_tokens_per_row: int | None = None  # None: rows no longer than the longest example
    chunk_size: int = 1024
    precision: str = "fp32"
    seed: int = 0

    @property
    def updates_per_rollout(self) -> int:
        return self.epochs * self.minibatches


@dataclass
class Experience:
    """A rollout made ready for a loss: examples (a prompt and its responses) and, by LossInputs field name, what the
    loss reads of each: per_response [n, k] (scores, ref_logps, old_logps), per_token (one flat tensor per example over
    its responses' tokens in packing order, as train.reference.score_examples returns them: ref_token_logps,
    old_token_logps, advantages, returns, old_values) and per_example [n] (consistency)."""

    examples: list[TokenizedExample]
    per_response: dict[str, torch.Tensor] = field(default_factory=dict)
    per_token: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # of the rollout: mean reward, KL, ...

    def fill(self, inputs: LossInputs, batch: PackedBatch, out: ResponseLogProbs) -> LossInputs:
        idx = batch.example_indices
        device = out.seq_logps.device
        for name, values in {**self.per_response, **self.per_example}.items():
            setattr(inputs, name, values[idx].to(device))
        for name, flat in self.per_token.items():
            joined = torch.cat([flat[i] for i in idx]).to(device)
            setattr(inputs, name, ResponseLogProbs(joined, out.seq_logps, out.lengths).padded(batch)[0])
        return inputs


def split_flat(values: torch.Tensor, examples: list[TokenizedExample]) -> list[torch.Tensor]:
    """A [B, k, T] tensor back to one flat tensor per example (its responses' tokens in order), the Experience form."""
    out = []
    for b, example in enumerate(examples):
        out.append(torch.cat([values[b, i, :n] for i, n in enumerate(example.trained_lengths)]))
    return out


def pad_flat(flat: list[torch.Tensor], examples: list[TokenizedExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """One flat tensor per example -> ([B, k, T] zero-padded, bool mask): the inverse of split_flat."""
    lengths = [e.trained_lengths for e in examples]
    k, T = len(lengths[0]), max(max(row) for row in lengths)
    values = torch.zeros(len(examples), k, T)
    mask = torch.zeros(len(examples), k, T, dtype=torch.bool)
    for b, (row, counts) in enumerate(zip(flat, lengths)):
        for i, part in enumerate(torch.split(row, counts)):
            values[b, i, :len(part)] = part
            mask[b, i, :len(part)] = True
    return values, mask


class ValueHead(torch.nn.Module):
    """V(s_t): a linear map of the hidden state that predicts token t (so the state is prompt + y_<t). Starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


class Learner:
    """Holds the policy (and value head), the optimizer, and the update count; `update` trains on one Experience."""

    def __init__(self, model, cfg: LearnerConfig, pad_token_id: int, value_head: ValueHead | None = None):
        self.model, self.cfg, self.pad_token_id, self.value_head = model, cfg, pad_token_id, value_head
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        if value_head is not None:
            value_head.to(next(model.parameters()).device)
            groups.append({"params": list(value_head.parameters()),
                           "lr": cfg.value_learning_rate or cfg.learning_rate})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.updates = 0

    def parameters(self):
        yield from (p for group in self.optimizer.param_groups for p in group["params"])

    def _autocast(self):
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def forward(self, batch: PackedBatch) -> tuple[ResponseLogProbs, torch.Tensor | None]:
        """Log-probs of the batch's responses and, with a value head, per-token values [B, k, T] from the same pass
        (a hook keeps the backbone's last hidden states that response_logprobs computes anyway)."""
        if self.value_head is None:
            return response_logprobs(self.model, batch, self.cfg.chunk_size), None
        captured = []
        handle = backbone(self.model).register_forward_hook(lambda module, args, output: captured.append(output[0]))
        try:
            out = response_logprobs(self.model, batch, self.cfg.chunk_size)
        finally:
            handle.remove()
        hidden = captured[0]
        selected = hidden[batch.token_rows.to(hidden.device), batch.token_pred_positions.to(hidden.device)]
        values = ResponseLogProbs(self.value_head(selected), out.seq_logps, out.lengths).padded(batch)[0]
        return out, values

    @torch.no_grad()
    def score(self, examples: list[TokenizedExample]):
        """The current policy's (behaviour) log-probs: ([n, k] summed, per-example flat token log-probs, per-example
        flat values or None), without gradients, in eval mode."""
        cfg = self.cfg
        if self.value_head is None:
            seq, tokens = score_examples(self.model, examples, cfg.max_tokens_per_batch, cfg.max_tokens_per_row,
                                         self.pad_token_id, cfg.precision, cfg.chunk_size)
            return seq, tokens, None
        was_training = self.model.training
        self.model.eval()
        seq = torch.zeros(len(examples), len(examples[0].response_ids))
        tokens: list[torch.Tensor] = [torch.empty(0)] * len(examples)
        values: list[torch.Tensor] = [torch.empty(0)] * len(examples)
        for indices in token_budget_batches(examples, cfg.max_tokens_per_batch, seed=0, shuffle=False):
            batch = pack([examples[i] for i in indices], indices, cfg.max_tokens_per_row, self.pad_token_id)
            with self._autocast():
                out, padded_values = self.forward(batch)
            seq[indices] = out.seq_logps.float().cpu()
            mask = out.padded(batch)[1]
            counts = out.lengths.sum(1).long().tolist()
            for i, part, row_values, row_mask in zip(indices, torch.split(out.token_logps.float().cpu(), counts),
                                                    padded_values.float().cpu(), mask):
                tokens[i], values[i] = part, row_values[row_mask]
        self.model.train(was_training)
        return seq, tokens, values

    def update(self, experience: Experience, spec, opts) -> dict[str, float]:
        """cfg.epochs passes over the experience, each in cfg.minibatches optimizer steps (examples shuffled, seeded by
        the update count); a minibatch over max_tokens_per_batch accumulates gradients over micro-batches. Returns the
        mean loss, gradient norm and loss metrics over every example seen."""
        examples, cfg = experience.examples, self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + self.updates)
        sums: dict[str, float] = {}
        seen, loss_total, norm_total, steps = 0, 0.0, 0.0, 0
        self.model.train()
        for _ in range(cfg.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for part in (order[i::cfg.minibatches] for i in range(cfg.minibatches)):
                if not part:
                    continue
                step_loss = self._accumulate_gradients(experience, part, spec, opts, sums)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.parameters()),
                                                                 cfg.max_grad_norm or float("inf")))
                problem = nonfinite_reason(step_loss, grad_norm)
                if problem is not None:
                    raise AlignkitError(f"online update {self.updates + 1}: {problem}; lower learning_rate")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.updates += 1
                seen += len(part)
                loss_total, norm_total, steps = loss_total + step_loss, norm_total + grad_norm, steps + 1
        metrics = {key: value / max(seen, 1) for key, value in sums.items()}
        return {"loss": loss_total / max(steps, 1), "grad_norm": norm_total / max(steps, 1), "updates": steps, **metrics}

    def _accumulate_gradients(self, experience: Experience, part: list[int], spec, opts, sums: dict) -> float:
        """Forward + backward of one minibatch (example indices `part`) in token-budget micro-batches; the loss is the
        mean over the minibatch's examples whatever the split. Adds each metric's sum to `sums`."""
        examples, cfg = experience.examples, self.cfg
        step_lengths = mean_trained_lengths(examples, part)
        step_loss = 0.0
        for micro in token_budget_batches([examples[i] for i in part], cfg.max_tokens_per_batch, seed=0, shuffle=False):
            indices = [part[j] for j in micro]
            batch = pack([examples[i] for i in indices], indices, cfg.max_tokens_per_row, self.pad_token_id)
            with self._autocast():
                out, values = self.forward(batch)
                inputs = LossInputs(logps=out.seq_logps.float(), lengths=out.lengths, values=values,
                                    step_mean_lengths=step_lengths)
                if spec.needs_token_logps:
                    token_logps, token_mask = out.padded(batch)
                    inputs.token_logps, inputs.token_mask = token_logps, token_mask.to(token_logps.device)
                losses, metrics = spec.fn(experience.fill(inputs, batch, out), opts)
            loss = losses.sum() / len(part)
            loss.backward()
            step_loss += loss.item()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value.float().sum())
        return step_loss
