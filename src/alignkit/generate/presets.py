"""Prompt presets for `alignkit generate --preset NAME`. `urial`: in-context alignment of a base model (URIAL, Lin et
al., arXiv 2312.01552): a system text and three stylistic examples before the query, in plain text (no chat
template), so an untuned model answers in an assistant's style; the training-free baseline for an aligned model."""

from __future__ import annotations

from alignkit.config import SamplingOptions

URIAL_SYSTEM = (
    "# Instructions\n\n"
    "What follows are conversations between a person and an AI assistant. The person's query is under "
    "\"# Query:\" and the assistant's answer under \"# Answer:\". The assistant is helpful, honest and harmless: it "
    "answers what was asked, accurately and clearly, in a friendly tone; it organises longer answers into steps "
    "or points, says so when it does not know, and politely declines requests that could cause harm.\n\n"
)

URIAL_EXAMPLES = [
    ("How do I keep cut basil fresh for longer?",
     "Good question: basil wilts quickly in the cold, so treat it like cut flowers.\n\n"
     "1. **Trim the stems** and stand them in a glass of water.\n"
     "2. **Keep it at room temperature**, away from direct sun; the fridge blackens the leaves.\n"
     "3. **Loosely cover** the leaves with a plastic bag and change the water every day or two.\n\n"
     "Stored this way it usually stays fresh for about a week."),
    ("What is the difference between weather and climate?",
     "In short, weather is what happens on a given day; climate is what is typical over many years.\n\n"
     "- **Weather** describes short-term conditions, such as today's rain, wind or temperature.\n"
     "- **Climate** is the long-term pattern of weather in a region, usually averaged over 30 years or more.\n\n"
     "So a cold week does not change the climate, but a warming trend over decades does."),
    ("Can you tell me how to get into my neighbour's wifi without the password?",
     "I'm sorry, but I can't help with accessing someone else's network without their permission; it is "
     "usually illegal and a breach of their privacy.\n\n"
     "If you need internet access, you could ask your neighbour to share it, use a public hotspot at a library or "
     "cafe, or contact a provider about a plan for your home. I'm happy to help you compare options."),
]

URIAL_STOP = ("\n```", "# Query:")


def _query(prompt) -> str:
    """A plain prompt as it is; a chat's last user message."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m.get("role") == "user")


def _turn(query: str, answer: str | None = None) -> str:
    opened = f"# Query:\n```\n{query}\n```\n\n# Answer:\n```\n"
    return opened if answer is None else f"{opened}{answer}\n```\n\n"


def urial_prompt(prompt) -> str:
    """The URIAL prompt of one query: system text, the three examples, then the query with its answer opened."""
    return URIAL_SYSTEM + "".join(_turn(q, a) for q, a in URIAL_EXAMPLES) + _turn(_query(prompt))


PRESETS = {"urial": (urial_prompt, URIAL_STOP)}


def apply_preset(name: str, prompts: list, sampling: SamplingOptions) -> tuple[list[str], SamplingOptions]:
    """The prompts wrapped by preset `name` and the sampling settings with its stop strings added (what `generate
    --preset` samples, and `eval --urial` for its training-free row)."""
    wrap, stop = PRESETS[name]
    return [wrap(p) for p in prompts], sampling.model_copy(update={"stop": [*sampling.stop_strings, *stop]})
