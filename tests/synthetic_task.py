"""Shared by test_generate, test_decode and test_eval_judges: the quickstart's synthetic review task with a tiny
Llama after brief SFT, trained once per test process (cached) and saved to a directory for the CLI tests.

The SFT data also teaches the user turn of a tiny chat template (prompt = the template's pre-query text,
completion = a review request + end of turn), the way an instruct model has seen user turns, so Magpie can
elicit prompts from it. A stand-in for an aligned model (for Transfer Q*) is the SFT model further tuned on
answers with at least two positive words more than negative ones."""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, prompt_records, sentiment_reward, sft_records
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.rewards.base import FunctionReward
from alignkit.train.loop import train

# A tiny chat template of the usual shape: role header, content, end-of-turn marker.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SENTIMENT = FunctionReward(lambda prompt, response: sentiment_reward(response), name="sentiment")


@dataclass
class Task:
    model: object
    tokenizer: object
    model_dir: Path
    root: Path


@contextlib.contextmanager
def single_thread():
    """torch on one thread: these models are so small that a second thread only adds synchronisation, and on a
    loaded 2-core machine oversubscription made training 7x slower (6 s against 47 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _common(root: Path, name: str) -> dict:
    return dict(model="tiny", loss="sft", max_length=64, max_tokens_per_batch=512, max_tokens_per_row=256, seed=0,
                progress=False, output_dir=str(root / name))


@functools.cache
def trained_task() -> Task:
    root = Path(tempfile.mkdtemp(prefix="alignkit-synthetic-task-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    tokenizer = build_word_tokenizer(VOCABULARY)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    records = sft_records(500, seed=0)
    records += [{"prompt": "<|user|>", "completion": f"{r['prompt']} <|end|>"} for r in prompt_records(400, seed=11)]
    write_jsonl_atomic(root / "sft.jsonl", records)
    model = build_tiny_model("llama", len(tokenizer), seed=0, hidden=64, layers=2)
    cfg = TrainConfig(train_data=str(root / "sft.jsonl"), learning_rate=5e-3, warmup_steps=5, epochs=4,
                      **_common(root, "sft"))
    model = train(cfg, model, tokenizer).model.eval()
    model_dir = root / "sft_model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return Task(model, tokenizer, model_dir, root)


@functools.cache
def aligned_model():
    """The SFT model tuned briefly on clearly positive answers: a stand-in for a model aligned to the reward."""
    task = trained_task()
    positive = [r for r in sft_records(1500, seed=5) if sentiment_reward(r["completion"]) >= 0.25][:150]
    write_jsonl_atomic(task.root / "positive.jsonl", positive)
    cfg = TrainConfig(train_data=str(task.root / "positive.jsonl"), learning_rate=2e-3, warmup_steps=2, epochs=1,
                      **_common(task.root, "aligned"))
    return train(cfg, copy.deepcopy(task.model), task.tokenizer).model.eval()


def prompts(n: int, seed: int = 3) -> list[str]:
    return [r["prompt"] for r in prompt_records(n, seed)]
