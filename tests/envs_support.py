"""Shared pieces of the environment tests: a word-level chat tokenizer whose template ends each turn with the token the
sampler stops on, a tiny Llama over it, a scripted engine (fixed replies, for tool-call tests) and small native
environments."""

from __future__ import annotations

import json

from alignkit.config import SamplingOptions
from alignkit.envs import Step
from alignkit.generate.engines import Generation
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer

# An empty turn renders with one space, as the word-level decoder joins an empty answer and its end token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}"
    "{% if message['content'] %} {% endif %}<|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# Drops every assistant turn but the last when rendering, as templates that strip earlier <think> blocks do.
FORGETFUL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}<|assistant|> ... <|end|> "
    "{% else %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = ["<|tool|>", "...", "hello", "again", "please", "try", "answer", "the", "sum", "of", "is", "two", "three",
         "five", "yes", "no", "good", "done", "what", "<tool_call>", "</tool_call>", '{"name":', '"add",',
         '"arguments":', '{"a":', "2,", '"b":', "3}}", "{bad", "5", "{", '"mul",', "5}", '"fails",', '"slow",',
         '{"x":', "1}}", '"calculate",', '{"expression":', '"2*3"}}', "6", "7"]
SAMPLING = SamplingOptions(max_new_tokens=6, temperature=1.0, stop=("<|end|>",), engine="hf")


def chat_tokenizer(template: str = CHAT_TEMPLATE):
    tokenizer = build_word_tokenizer(WORDS)
    tokenizer.chat_template = template
    tokenizer.eos_token = "<|end|>"  # the template's end of turn is the token the sampler stops on
    return tokenizer


def chat_model(tokenizer, seed: int = 0):
    return build_tiny_model("llama", len(tokenizer), seed=seed)


class ScriptedEngine:
    """Replies with fixed texts in turn, each ending with the end-of-turn token. replies: {marker word: texts}; a
    context is answered from the texts of the marker word it contains. Records each context and the ids returned."""

    def __init__(self, tokenizer, replies: dict[str, list[str]]):
        self.tokenizer, self.calls = tokenizer, []
        self.replies = {tokenizer.convert_tokens_to_ids(word): list(texts) for word, texts in replies.items()}

    def generate(self, prompt_ids, sampling, num_samples=1, seed=0):
        out = Generation(list(prompt_ids), [], [], [], [], [])
        rows, logps = [], []
        for ids in prompt_ids:
            marker = next(m for m in self.replies if m in ids)
            text = self.replies[marker].pop(0) + " <|end|>"
            row = self.tokenizer(text, add_special_tokens=False)["input_ids"][:sampling.max_new_tokens]
            rows.append(row)
            logps.append([-0.5 - 0.01 * j for j in range(len(row))])
            self.calls.append((list(ids), row))
        end = [self.tokenizer.eos_token_id]
        out.add_rows(self.tokenizer, rows, logps, num_samples, end, sampling.stop_strings)
        return out

    def update_weights(self, model):
        pass


class Echo:
    """Asks for `turns` answers, rewarding each with its length in tokens / 10; the last one ends it."""

    tools: list = []

    def __init__(self, turns: int = 3):
        self.turns, self.seen = turns, 0

    def reset(self, row):
        return [{"role": "user", "content": row["question"]}]

    def step(self, message):
        self.seen += 1
        reward = len(message["content"].split()) / 10
        done = self.seen >= self.turns
        return Step([] if done else [{"role": "user", "content": "try again please"}], reward, done, {"seen": self.seen})

    def close(self):
        pass


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def tool_call(name: str, **arguments) -> str:
    return "<tool_call> " + json.dumps({"name": name, "arguments": arguments}) + " </tool_call>"


class Notebook:
    """A TRL-style environment with a tool and no get_reward: the run's reward scores the last answer."""

    def reset(self, **row):
        self.notes = []

    def note(self, text: str) -> str:
        """Write a note down.

        Args:
            text: What to note.
        """
        self.notes.append(text)
        return f"noted {len(self.notes)}"


def word_count(prompt, response: str) -> float:
    """A reward that varies on a random policy's answers: words / 10."""
    return len(response.split()) / 10


class Parity:
    """Goes on while the answer has an odd number of words, for 3 turns at most: a random policy's conversations end
    after 1, 2 or 3 turns. Rewards each answer's length in words / 10."""

    tools: list = []

    def __init__(self):
        self.seen = 0

    def reset(self, row):
        return list(row["prompt"])

    def step(self, message):
        self.seen += 1
        words = len(message["content"].split())
        done = words % 2 == 0 or self.seen >= 3
        return Step([] if done else [{"role": "user", "content": "try again please"}], words / 10, done, {})

    def close(self):
        pass
