"""Property tests of the token bridge on a byte-level BPE tokenizer with ChatML templates (SmolLM2's, and one that
drops earlier <think> blocks as Qwen3's does): whatever ids the engine samples (non-canonical tokenisations
included) and whatever text the environment answers, the sequence is the prompt, the sampled ids and the rendered
environment turns, exactly, and decodes to the template's rendering of the conversation; the dropping template
forks exactly where an earlier answer held a </think>."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.config import SamplingOptions
from alignkit.data.template import render_chat
from alignkit.envs import Limits, Step, run_trajectories
from alignkit.generate.engines import Generation

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat template (no tool support)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DROPS_THINKING = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SAMPLING = SamplingOptions(max_new_tokens=64, temperature=1.0, engine="hf")


@functools.cache
def byte_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = "The quick brown fox jumps over the lazy dog. 0123456789 + - * / ( ) { } [ ] : , \" ' < > = ! ? # think"
    core.train_from_iterator([text] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>"])


@functools.cache
def ascii_ids() -> list[int]:
    tokenizer = byte_tokenizer()
    return [i for i in range(3, len(tokenizer)) if tokenizer.decode([i]).isascii()]


class Replay:
    """Returns the given replies in turn (ids as they are, then the end token unless the reply is cut)."""

    def __init__(self, replies: list[tuple[list[int], bool]]):
        self.replies, self.calls = list(replies), []

    def generate(self, prompt_ids, sampling, num_samples=1, seed=0):
        tokenizer = byte_tokenizer()
        ids, ended = self.replies.pop(0)
        row = ids + [tokenizer.eos_token_id] * ended
        self.calls.append(row)
        out = Generation(list(prompt_ids), [], [], [], [], [])
        out.add_rows(tokenizer, [row], [[-1.0] * len(row)], 1, [tokenizer.eos_token_id], ())
        return out

    def update_weights(self, model):
        pass


class Scripted:
    tools: list = []

    def __init__(self, answers: list[str]):
        self.answers = list(answers)

    def reset(self, row):
        return [{"role": "user", "content": row["question"]}]

    def step(self, message):
        done = not self.answers
        return Step([] if done else [{"role": "user", "content": self.answers.pop(0)}], 1.0, done, {})

    def close(self):
        pass


text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
reply = st.tuples(st.lists(st.sampled_from(range(400)), max_size=12), st.booleans())


def run(template: str, question: str, replies, answers):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = template
    pool = ascii_ids()
    replies = [([pool[i % len(pool)] for i in ids], ended) for ids, ended in replies]
    engine = Replay(replies)
    [trajectory] = run_trajectories(engine, tokenizer, [Scripted(answers)], [{"question": question}], SAMPLING,
                                    Limits(max_turns=len(replies), max_tokens=4096))
    return trajectory, engine, tokenizer


@settings(max_examples=40, deadline=None)
@given(text, st.lists(reply, min_size=1, max_size=4), st.lists(text, min_size=3, max_size=3))
def test_the_sequence_is_the_sampled_ids_and_the_rendered_turns(question, replies, answers):
    trajectory, engine, tokenizer = run(SMOLLM2_TEMPLATE, question, replies, answers[:len(replies) - 1])
    assert trajectory.forks == 0
    ids, mask = trajectory.ids, trajectory.loss_mask
    assert [t for t, m in zip(ids, mask) if m] == [t for call in engine.calls for t in call]
    conversation = [{"role": m["role"], "content": m.get("text", m["content"])} for m in trajectory.messages]
    rendered = render_chat(tokenizer, conversation, add_generation_prompt=False)
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    assert rendered.startswith(decoded) and rendered[len(decoded):] in ("\n", "<|im_end|>\n")
    prompt = render_chat(tokenizer, conversation[:1], add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the head, also when no reply has a token
    assert ids[:len(prompt_ids)] == prompt_ids and not any(mask[:len(prompt_ids)])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(text, st.booleans()), min_size=2, max_size=4))
def test_a_template_dropping_earlier_thinking_forks_exactly_there(turns):
    tokenizer = byte_tokenizer()
    replies = [(tokenizer(("<think>hm</think>" if think else "") + body, add_special_tokens=False)["input_ids"], True)
               for body, think in turns]
    trajectory, engine, _ = run(DROPS_THINKING, "q", [([ascii_ids().index(i) for i in ids], e) for ids, e in replies],
                                ["go on"] * (len(turns) - 1))
    assert trajectory.forks == sum(think for _, think in turns[:-1])
    sampled = [[t for t, m in zip(s.ids, s.loss_mask) if m] for s in trajectory.segments]
    assert [t for s in sampled for t in s] == [t for call in engine.calls for t in call]  # each sampled id, once
