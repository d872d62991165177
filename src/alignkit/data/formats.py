"""TRL's dataset formats that alignkit's shapes do not name directly, mapped onto them.

Implicit prompt (trl-lib/ultrafeedback_binarized, Anthropic/hh-rlhf): a preference pair with no `prompt`, whose
`chosen` and `rejected` are whole conversations (message lists) or whole transcripts (strings). The prompt is their
longest shared beginning; what follows must be one final assistant turn on each side.
- Conversations: the shared leading messages are the prompt; each side must then hold exactly one assistant message.
- Strings: the shared beginning up to the last "Assistant:" turn marker inside it (HH's "\\n\\nAssistant:"), or else
  to the last whitespace (TRL's extract_prompt backs off the same way), so no word is split."""

from __future__ import annotations

import re

_ASSISTANT_MARK = re.compile(r"\n\nAssistant:[ ]?")


class FormatError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def split_implicit_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen response, rejected response) of a pair given as two whole conversations or transcripts."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _split_strings(chosen, rejected)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _split_messages(chosen, rejected)
    raise FormatError("prompt", "missing field (an implicit prompt needs chosen and rejected both conversations or "
                                "both strings)")


def _split_messages(chosen: list, rejected: list) -> tuple:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise FormatError("prompt", "missing field, and chosen and rejected share no leading turn to take as an "
                                    "implicit prompt")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        rest = messages[shared:]
        if not rest:
            raise FormatError(side, "no prompt field, and nothing follows the turns chosen and rejected share")
        if len(rest) != 1 or not isinstance(rest[0], dict) or rest[0].get("role") != "assistant":
            raise FormatError(f"{side}[{shared}]", f"chosen and rejected differ at turn {shared}, before their last "
                                                   "assistant turn; an implicit prompt needs them to differ only in "
                                                   "that final turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _split_strings(chosen: str, rejected: str) -> tuple:
    limit = min(len(chosen), len(rejected))
    shared = next((i for i in range(limit) if chosen[i] != rejected[i]), limit)
    head = chosen[:shared]
    marks = list(_ASSISTANT_MARK.finditer(head))
    if marks:
        cut = marks[-1].end()
    else:
        cut = max(head.rfind(" "), head.rfind("\n")) + 1
    if cut <= 0 or not head[:cut].strip():
        raise FormatError("prompt", "missing field, and chosen and rejected share no leading text to take as an "
                                    "implicit prompt")
    if not chosen[cut:].strip() or not rejected[cut:].strip():
        side = "chosen" if not chosen[cut:].strip() else "rejected"
        raise FormatError(side, "no prompt field, and nothing follows the text chosen and rejected share")
    return chosen[:cut], chosen[cut:], rejected[cut:]
