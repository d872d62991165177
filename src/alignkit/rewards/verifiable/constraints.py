"""Instruction-following constraints a program can check, in the style of IFEval (Zhou et al., arXiv 2311.07911) and
Tulu 3's RLVR (arXiv 2411.15124). A record's `constraints` field lists specs such as
`[{"type": "max_words", "n": 30}, {"type": "include", "words": ["river"]}]`; the reward is the fraction met, plus
`all_met_bonus` when every one is.

Words are runs of letters, digits and apostrophes; sentences end at . ! or ? (or the text's end); paragraphs are
separated by blank lines; a bullet is a line starting with `* ` or `- `."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from alignkit.rewards.verifiable.records import RecordReward

_WORD = re.compile(r"[A-Za-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_BULLET = re.compile(r"^\s*[*-] +\S", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
_TITLE = re.compile(r"<<[^<>\n]+>>")
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if _WORD.search(s)]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9']){re.escape(word)}(?![A-Za-z0-9'])", text, re.IGNORECASE) is not None


def _is_json(text: str) -> bool:
    try:
        json.loads(_FENCE.sub("", text.strip()))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Checker:
    args: dict[str, str]  # argument -> kind: "count" (int >= 0), "words" (non-empty list of words), "phrase"
    check: Callable[..., bool]  # (text, **args) -> met?
    describe: Callable[..., str]  # (**args) -> the instruction as a prompt states it


CHECKERS: dict[str, Checker] = {
    "max_words": Checker({"n": "count"}, lambda t, n: 0 < len(words(t)) <= n,
                         lambda n: f"Answer in at most {n} words."),
    "min_words": Checker({"n": "count"}, lambda t, n: len(words(t)) >= n,
                         lambda n: f"Answer in at least {n} words."),
    "max_sentences": Checker({"n": "count"}, lambda t, n: 0 < len(sentences(t)) <= n,
                             lambda n: f"Use at most {n} sentence{'s' * (n != 1)}."),
    "min_sentences": Checker({"n": "count"}, lambda t, n: len(sentences(t)) >= n,
                             lambda n: f"Use at least {n} sentences."),
    "lowercase": Checker({}, lambda t: bool(re.search("[a-z]", t)) and t == t.lower(),
                         lambda: "Write everything in lowercase letters, with no capital letters at all."),
    "uppercase": Checker({}, lambda t: bool(re.search("[A-Z]", t)) and t == t.upper(),
                         lambda: "Write everything in CAPITAL LETTERS."),
    "max_capital_words": Checker({"n": "count"}, lambda t, n: sum(w.isupper() for w in words(t)) <= n,
                                 lambda n: f"Use at most {n} words written fully in capital letters." if n else
                                 "Do not write any word fully in capital letters."),
    "include": Checker({"words": "words"}, lambda t, words: all(_has_word(t, w) for w in words),
                       lambda words: "Include the word" + ("s " if len(words) > 1 else " ")
                       + " and ".join(f'"{w}"' for w in words) + "."),
    "exclude": Checker({"words": "words"}, lambda t, words: not any(_has_word(t, w) for w in words),
                       lambda words: "Do not use the word" + ("s " if len(words) > 1 else " ")
                       + " or ".join(f'"{w}"' for w in words) + "."),
    "no_commas": Checker({}, lambda t: "," not in t, lambda: "Do not use any commas."),
    "starts_with": Checker({"phrase": "phrase"}, lambda t, phrase: t.strip().lower().startswith(phrase.lower()),
                           lambda phrase: f'Start your answer with "{phrase}".'),
    "ends_with": Checker({"phrase": "phrase"}, lambda t, phrase: t.strip().lower().endswith(phrase.lower()),
                         lambda phrase: f'End your answer with "{phrase}".'),
    "bullets": Checker({"n": "count"}, lambda t, n: len(_BULLET.findall(t)) == n,
                       lambda n: f"Answer with exactly {n} bullet points, each on its own line starting with \"* \"."),
    "paragraphs": Checker({"n": "count"}, lambda t, n: len(paragraphs(t)) == n,
                          lambda n: f"Write exactly {n} paragraphs, separated by blank lines."),
    "quoted": Checker({}, lambda t: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"',
                      lambda: "Wrap your whole answer in double quotation marks."),
    "title": Checker({}, lambda t: _TITLE.search(t) is not None,
                     lambda: "Give your answer a title wrapped in double angular brackets, like <<title>>."),
    "json": Checker({}, _is_json, lambda: "Format your whole answer as valid JSON."),
    "placeholders": Checker({"n": "count"}, lambda t, n: len(_PLACEHOLDER.findall(t)) >= n,
                            lambda n: f"Include at least {n} placeholders in square brackets, like [name]."),
}


def _s(n: int) -> str:
    return "s" * (n != 1)


def _word_list(words: list[str], joiner: str) -> str:
    return "word" + _s(len(words)) + " " + f" {joiner} ".join(f'"{w}"' for w in words)


# Other wordings of each checker's instruction, for held-out prompts (prompts.phrasing_set): the same spec and the
# same checker, never the training wording (no word 4-gram in common with it once the arguments are set aside).
HELD_OUT_PHRASINGS: dict[str, tuple[Callable[..., str], ...]] = {
    "max_words": (lambda n: f"Keep your answer to no more than {n} words.",
                  lambda n: f"Your reply must not exceed {n} word{_s(n)}.",
                  lambda n: f"Use {n} word{_s(n)} or fewer."),
    "min_words": (lambda n: f"Write no fewer than {n} words.",
                  lambda n: f"Your reply should be {n} words long or longer.",
                  lambda n: f"Make your response contain {n} or more words."),
    "max_sentences": (lambda n: f"Keep your reply to no more than {n} sentence{_s(n)}.",
                      lambda n: f"Do not write more than {n} sentence{_s(n)}.",
                      lambda n: f"Your response must have {n} sentence{_s(n)} or fewer."),
    "min_sentences": (lambda n: f"Write no fewer than {n} sentences.",
                      lambda n: f"Your reply should contain {n} or more sentences.",
                      lambda n: f"Make your answer {n} sentences long or longer."),
    "lowercase": (lambda: "Your entire reply must be in lowercase letters; capital letters are not allowed.",
                  lambda: "Use only small letters: do not capitalise any letter, not even the first.",
                  lambda: "Type your whole response in lower case, with no uppercase letters."),
    "uppercase": (lambda: "Your entire reply must be in uppercase letters.",
                  lambda: "Use only capital letters: no lowercase letter anywhere in your response.",
                  lambda: "Type your whole response in upper case."),
    "max_capital_words": (
        lambda n: f"No more than {n} word{_s(n)} of your reply may be written entirely in uppercase." if n else
        "No word of your reply may be written entirely in uppercase.",
        lambda n: f"Limit all-caps words to {n} or fewer." if n else "Avoid all-caps words completely.",
        lambda n: f"Put {n} whole word{_s(n)} or fewer in upper case." if n else
        "Do not put any whole word in upper case."),
    "include": (lambda words: f"Use the {_word_list(words, 'and')} somewhere in your answer.",
                lambda words: f"Make sure your reply contains the {_word_list(words, 'and')}.",
                lambda words: f"Your response must mention the {_word_list(words, 'and')}."),
    "exclude": (lambda words: f"Avoid the {_word_list(words, 'and')}.",
                lambda words: f"Never use the {_word_list(words, 'or')} in your reply.",
                lambda words: f"Your response must not contain the {_word_list(words, 'or')}."),
    "no_commas": (lambda: "Avoid commas entirely.",
                  lambda: "Your reply must not contain a single comma.",
                  lambda: "Leave out every comma: none may appear in your response."),
    "starts_with": (lambda phrase: f'Begin your reply with "{phrase}".',
                    lambda phrase: f'The first words of your response must be "{phrase}".',
                    lambda phrase: f'Open your answer with the phrase "{phrase}".'),
    "ends_with": (lambda phrase: f'Finish your reply with "{phrase}".',
                  lambda phrase: f'The last words of your response must be "{phrase}".',
                  lambda phrase: f'Close your answer with the phrase "{phrase}".'),
    "bullets": (lambda n: f'Your reply must contain exactly {n} bullet point{_s(n)}, each a line beginning with "- ".',
                lambda n: f'Format your answer as a list of exactly {n} item{_s(n)}, one per line, each starting '
                          f'with "* ".',
                lambda n: f'List exactly {n} point{_s(n)}, each on a new line that begins with "- ".'),
    "paragraphs": (lambda n: f"Your reply must have exactly {n} paragraph{_s(n)}, with an empty line between them.",
                   lambda n: f"Split your response into exactly {n} paragraph{_s(n)}, with a blank line between one "
                             f"paragraph and the next.",
                   lambda n: f"Write {n} paragraph{_s(n)}, no more and no fewer, divided by empty lines."),
    "quoted": (lambda: "Put your entire response inside double quotes.",
               lambda: "Enclose the whole reply in a pair of double quotes.",
               lambda: 'Start and end your reply with a double quote mark (").'),
    "title": (lambda: "Include a title in double angle brackets, such as <<my title>>.",
              lambda: "Your reply must contain a title inside << and >>, for example <<A Good Day>>.",
              lambda: "Add a title to your response, enclosed in double angle brackets like <<Notes on a Theme>>."),
    "json": (lambda: "Your entire response must be valid JSON.",
             lambda: "Reply only in JSON format: the whole reply has to parse as JSON.",
             lambda: "Make your whole reply one valid JSON document."),
    "placeholders": (lambda n: f"Use {n} or more placeholders written in square brackets, such as [address].",
                     lambda n: f"Your reply must have no fewer than {n} bracketed placeholder{_s(n)}, for example "
                               f"[date].",
                     lambda n: f"Put {n} placeholder{_s(n)} or more in your answer, each inside square brackets "
                               f"like [city]."),
}


# More training wordings of each checker's instruction, next to the checker's own (prompts.vary_training draws one
# per instruction), so training rewards following the instruction rather than one sentence. Like the held-out ones
# they state exactly what the checker checks, and they share no word 4-gram with any held-out phrasing.
TRAINING_PHRASINGS: dict[str, tuple[Callable[..., str], ...]] = {
    "max_words": (lambda n: f"Respond with {n} word{_s(n)} at most.",
                  lambda n: f"Limit your answer to a maximum of {n} word{_s(n)}."),
    "min_words": (lambda n: f"Your answer needs at least {n} words.",
                  lambda n: f"Write a response of at least {n} words."),
    "max_sentences": (lambda n: f"Respond in at most {n} sentence{_s(n)}.",
                      lambda n: f"Limit your answer to {n} sentence{_s(n)}."),
    "min_sentences": (lambda n: f"Your answer needs at least {n} sentences.",
                      lambda n: f"Respond in at least {n} sentences."),
    "lowercase": (lambda: "Respond in lowercase only; do not use a single capital letter.",
                  lambda: "Do not use capital letters anywhere: write all of it in lowercase."),
    "uppercase": (lambda: "Respond in capital letters only.",
                  lambda: "Every letter of your answer must be a capital letter."),
    "max_capital_words": (
        lambda n: f"At most {n} word{_s(n)} in your answer may be all capitals." if n else
        "None of your words may be in all capitals.",
        lambda n: f"Write at most {n} word{_s(n)} in all capital letters." if n else
        "Write no word in all capital letters."),
    "include": (lambda words: f"Be sure to use the {_word_list(words, 'and')}.",
                lambda words: f"Your answer should include the {_word_list(words, 'and')}."),
    "exclude": (lambda words: f"Leave out the {_word_list(words, 'and')} entirely.",
                lambda words: f"Your answer must not include the {_word_list(words, 'or')}."),
    "no_commas": (lambda: "Write without using any commas.",
                  lambda: "Commas are not allowed in your answer."),
    "starts_with": (lambda phrase: f'Your answer must begin with "{phrase}".',
                    lambda phrase: f'Put "{phrase}" at the very start of your answer.'),
    "ends_with": (lambda phrase: f'Your answer must end with "{phrase}".',
                  lambda phrase: f'Put "{phrase}" at the very end of your answer.'),
    "bullets": (lambda n: f'Give exactly {n} bullet point{_s(n)}; start each line with "* ".',
                lambda n: f'Write your answer as exactly {n} bullet point{_s(n)}: every bullet is its own line and '
                          f'starts with "* ".'),
    "paragraphs": (lambda n: f"Your answer should be exactly {n} paragraph{_s(n)} long; separate paragraphs by an "
                             f"empty line.",
                   lambda n: f"Structure your answer as exactly {n} paragraph{_s(n)}, each separated from the next "
                             f"by a blank line."),
    "quoted": (lambda: "Your whole answer must be in double quotation marks.",
               lambda: 'Place the " character at the very start and the very end of your answer.'),
    "title": (lambda: "Your answer needs a title surrounded by << and >>, for instance <<Morning Light>>.",
              lambda: "Mark a title for your answer with double angular brackets, e.g. <<Quiet Roads>>."),
    "json": (lambda: "Reply with valid JSON only.",
             lambda: "Write your answer entirely in valid JSON."),
    "placeholders": (lambda n: f"Add at least {n} bracketed placeholder{_s(n)} such as [place] to your answer.",
                     lambda n: f"Include {n} or more placeholders in square brackets, for instance [time]."),
}


def _check_arg(kind: str, name: str, value, where: str):
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: '{name}' must be an integer >= 0, got {value!r}")
        return value
    if kind == "phrase":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: '{name}' must be a non-empty string, got {value!r}")
        return value.strip()
    if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise ValueError(f"{where}: '{name}' must be a non-empty list of non-empty strings, got {value!r}")
    return [w.strip() for w in value]


def validate_constraints(value) -> list[dict]:
    """A `constraints` field checked and normalised; ValueError naming the bad constraint and argument."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of constraint objects, got {value!r}")
    out = []
    for i, spec in enumerate(value):
        where = f"constraint {i + 1}"
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise ValueError(f"{where}: expected an object with a string 'type', got {spec!r}")
        kind = spec["type"]
        if kind not in CHECKERS:
            raise ValueError(f"{where}: unknown type {kind!r}; known: {', '.join(CHECKERS)}")
        args = CHECKERS[kind].args
        extra = sorted(set(spec) - set(args) - {"type"})
        if extra:
            raise ValueError(f"{where} ({kind}): unknown argument(s) {', '.join(extra)}; it takes "
                             f"{', '.join(args) or 'none'}")
        missing = [a for a in args if a not in spec]
        if missing:
            raise ValueError(f"{where} ({kind}): missing argument(s) {', '.join(missing)}")
        out.append({"type": kind, **{a: _check_arg(k, a, spec[a], f"{where} ({kind})") for a, k in args.items()}})
    return out


def check(spec: dict, text: str) -> bool:
    return bool(CHECKERS[spec["type"]].check(text, **{k: v for k, v in spec.items() if k != "type"}))


def check_all(constraints: list[dict], text: str) -> list[bool]:
    return [check(spec, text) for spec in constraints]


def describe(spec: dict, phrasing: int = 0) -> str:
    """The instruction for a spec in one of its wordings: 0 is the checker's own (the training prompts' wording),
    1.. the held-out phrasings. Every wording states exactly what the checker checks."""
    args = {k: v for k, v in spec.items() if k != "type"}
    if phrasing == 0:
        return CHECKERS[spec["type"]].describe(**args)
    return HELD_OUT_PHRASINGS[spec["type"]][phrasing - 1](**args)


def describe_training(spec: dict, wording: int = 0) -> str:
    """The instruction for a spec in one of its training wordings: 0 the checker's own, 1.. TRAINING_PHRASINGS."""
    args = {k: v for k, v in spec.items() if k != "type"}
    if wording == 0:
        return CHECKERS[spec["type"]].describe(**args)
    return TRAINING_PHRASINGS[spec["type"]][wording - 1](**args)


def n_training_wordings(kind: str) -> int:
    return 1 + len(TRAINING_PHRASINGS[kind])


def n_phrasings(kind: str) -> int:
    """How many wordings describe has for a type, the training one included."""
    return 1 + len(HELD_OUT_PHRASINGS[kind])


def repeated_share(text: str) -> float:
    """Share of a text's word bigrams that repeat an earlier bigram of the same text (0: none repeats)."""
    tokens = [w.lower() for w in words(text)]
    bigrams = list(zip(tokens, tokens[1:]))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


class ConstraintReward(RecordReward):
    """Fraction of the prompt's constraints the response meets, plus all_met_bonus when it meets them all.

    Guards against the degenerate answers RL finds first (a bare "That is all.", a keyword in quotes, a list of
    empty bullets, "[name] [name] [name]"): an answer of fewer than min_words words, or whose repeated bigram share
    exceeds max_repeat, scores 0. They shape training only; compliance is measured by the checkers alone."""

    field = "constraints"

    def __init__(self, all_met_bonus: float = 0.0, min_words: int = 0, max_repeat: float = 1.0,
                 name: str = "constraints"):
        super().__init__()
        self.all_met_bonus, self.min_words, self.max_repeat, self.name = all_met_bonus, min_words, max_repeat, name

    def parse(self, value):
        return validate_constraints(value)

    def score_one(self, constraints, response: str) -> float:
        if len(words(response)) < self.min_words or repeated_share(response) > self.max_repeat:
            return 0.0
        met = check_all(constraints, response)
        return sum(met) / len(met) + (self.all_met_bonus if all(met) else 0.0)
