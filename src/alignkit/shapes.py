"""The data shapes: the fields a record of each shape must hold, and the shapes a loss may train on. One vocabulary
below both the data loader (which checks records against it) and the losses (each declares the shape it needs), so
neither imports the other for it."""

from __future__ import annotations

# Fields each record shape requires; any other field is kept as it is.
SHAPES: dict[str, tuple[str, ...]] = {
    "pairs": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "lists": ("prompt", "responses", "scores"),
    "sft": ("prompt", "completion"),
    # D2O: a human-labelled negative and K samples of the starting model for the same prompt (K the same everywhere).
    "negatives": ("prompt", "rejected", "samples"),
    # LOGO: one preferred response and M dis-preferred ones for the same prompt (M the same everywhere).
    "rejections": ("prompt", "chosen", "rejections"),
    # TRL's stepwise supervision (process reward models): the steps of one solution and a label per step.
    "stepwise": ("prompt", "completions", "labels"),
    "prompts": ("prompt",),
    # A whole conversation; every assistant turn is trained. An "sft" record may be a chat too (see fields_of).
    "chat": ("messages",),
}
# The shapes a loss may train on: the record shapes but prompts and chat (read as sft), plus "rollouts": a prompt
# with k responses sampled by the policy and their rewards, made by alignkit.online, never read from a file.
DATA_SHAPES = (*(shape for shape in SHAPES if shape not in ("prompts", "chat")), "rollouts")


def fields_of(record: dict, shape: str) -> tuple[str, ...]:
    """The fields `record` must have for `shape`: an "sft" record with `messages` and no `prompt` is a chat; one with
    only `text` is TRL's language-modelling format (every token trained)."""
    if shape == "sft" and "messages" in record and "prompt" not in record:
        return SHAPES["chat"]
    if shape == "sft" and "text" in record and "prompt" not in record and "messages" not in record:
        return ("text",)
    return SHAPES[shape]
