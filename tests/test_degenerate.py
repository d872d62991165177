"""Degeneracy flags (rewards/verifiable/degenerate.py): each flag on hand-written answers that must trip it (the
issue's answers among them) and on honest ones that must not; the guard; the per-flag shares; and how often honest
answers to the shipped prompts are flagged."""

from __future__ import annotations

import json
import random
from importlib.resources import files

import pytest

from alignkit.errors import DataError
from alignkit.rewards.base import FunctionReward
from alignkit.rewards.verifiable import CHECKERS, ConstraintReward, check_all
from alignkit.rewards.verifiable import degenerate as dg
from alignkit.rewards.verifiable.degenerate import FLAGS, DegenerateGuard, flag_shares, flagged, flags
from alignkit.rewards.verifiable.prompts import TOPICS, prompt_sets

MARKETS = ('Write a short description of street markets. End your answer with "That is all.". Include at least 2 '
           "placeholders in square brackets, like [name].")
MARKETS_C = [{"type": "ends_with", "phrase": "That is all."}, {"type": "placeholders", "n": 2}]
POST = 'Tell me about the post office. Include the word "window". Do not use any commas.'
POST_C = [{"type": "include", "words": ["window"]}, {"type": "no_commas"}]
RIVERS = 'Tell me about rivers. Include the word "river".'
RIVERS_C = [{"type": "include", "words": ["river"]}]
BEES = ('Give me some advice about honey bees. Answer with exactly 2 bullet points, each on its own line starting '
        'with "* ". Do not use any commas.')
HOUSE = ('What do you like about house plants? Include the word "lantern". Give your answer a title wrapped in double '
         "angular brackets, like <<title>>.")
HOUSE_C = [{"type": "include", "words": ["lantern"]}, {"type": "title"}]
STUFFED = ("The post office is called the window. It's a beautiful piece of furniture with a window that looks "
           "out on a window. The window sells stamps and the window weighs parcels.")

# flag -> [(answer, constraints, prompt)] that must trip it
TRIP = {
    "repetition": [
        ("In the heart of [name], [name] street markets [name] are the vibrant [name] of [name]: [name] [name] "
         "[name] …", MARKETS_C, MARKETS),
        ("bees are good bees are good bees are good bees are good", None, None),
        ("the market the stall the fruit the bread the fish the cheese the end", None, None),
    ],
    "copied_example": [
        ("In the heart of [name], [name] street markets are vibrant. That is all.", MARKETS_C, MARKETS),
        ("<<title>>\nHouse plants clean the air and glow like a lantern by the window.", HOUSE_C, HOUSE),
        ("<<Title>>\nPlants are nice.", None, None),
        ("<< ... >>\nPlants are nice.", None, None),
        ("Markets sell [placeholder] and [ ]. That is all.", MARKETS_C, MARKETS),
        ("Stalls sell fruit by [address] and [ADDRESS]. That is all.", MARKETS_C,
         "Describe street markets. Include at least 2 placeholders in square brackets, such as [address]."),
        ('"window"', POST_C, POST),
        ("Window.", POST_C, None),
        ("In short. That is all.", [{"type": "starts_with", "phrase": "In short"},
                                    {"type": "ends_with", "phrase": "That is all."}], None),
    ],
    "empty_items": [
        ("* *pure* bees …*\n* bees make honey", None, BEES),
        ("* ***\n* ***", None, BEES),
        ("* *\n* Keep the hive dry", None, BEES),
        ("* Keep the hive dry\n*\n- ", None, BEES),
        ("- ...\n- Plant clover near the hive", None, BEES),
    ],
    "keyword_stuffing": [
        (STUFFED, POST_C, POST),
        ("window window window window", POST_C, POST),
        ("Rivers river river river river river river river river river flow to the sea.", RIVERS_C, RIVERS),
    ],
    "restates_prompt": [
        ("Tell me about the post office. Include the word window.", POST_C, POST),
        ("* Give me some advice about honey bees\n* Answer with exactly 2 bullet points", None, BEES),
    ],
}

HONEST = [
    ("Street markets fill [town square] every [weekday] with fruit stalls and music. That is all.", MARKETS_C, MARKETS),
    ("Dear [name], meet me at [address] by the fish stall. That is all.", MARKETS_C, MARKETS),
    ("The post office is where you send letters and parcels. You wait in line until a clerk calls you to the window.",
     POST_C, POST),
    ("A river starts as rain in the hills. The river carves a valley and the river carries sand to the sea. People "
     "have always built towns beside a river because a river brings water and trade.", RIVERS_C, RIVERS),
    ("* Wear a veil and gloves when you open the hive\n* Plant clover and lavender nearby", None, BEES),
    ("* **Calm:** move slowly near the hive\n* *Water:* leave a shallow dish out in summer", None, BEES),
    ("* Keep the hive dry\n* Keep the hive warm\n* Keep the hive clean", None, BEES),
    ("<<Green Friends>>\nHouse plants clean the air and a fern by a lantern makes a cosy corner.", HOUSE_C, HOUSE),
    ("Window boxes are lovely. A post office often has a window where you buy stamps.", POST_C, POST),
    ("I like the quiet of an old library, the smell of paper and the long tables in the reading room.", None, None),
    ("Some advice about honey bees: stay calm and move slowly.", None, "Give me some advice about honey bees."),
    ("Here is my answer: bees need calm hands.", [{"type": "starts_with", "phrase": "Here is my answer"}],
     'Give me some advice about honey bees. Start your answer with "Here is my answer".'),
    ('{"topic": "volcanoes", "answer": "Volcanoes are openings where melted rock reaches the surface."}',
     [{"type": "json"}], "Tell me about volcanoes. Format your whole answer as valid JSON."),
    ("LAKES ARE CALM AND COLD. FISH SWIM UNDER THE ICE ALL WINTER.", [{"type": "uppercase"}], None),
    ('"The moon pulls the tides and lights the night."', [{"type": "quoted"}], None),
    ("Kites need wind.\n\nPick an open field away from trees.", [{"type": "paragraphs", "n": 2}], None),
]


def _flag(name, answer, constraints, prompt) -> bool:
    """One flag's own function, called with the arguments it takes."""
    if name in ("repetition", "empty_items"):
        return getattr(dg, name)(answer)
    if name == "restates_prompt":
        return dg.restates_prompt(answer, prompt)
    return getattr(dg, name)(answer, constraints, prompt)


@pytest.mark.parametrize("flag,answer,constraints,prompt",
                         [(f, *case) for f, cases in TRIP.items() for case in cases])
def test_each_flag_trips_on_its_degenerate_answers(flag, answer, constraints, prompt):
    assert _flag(flag, answer, constraints, prompt)
    assert flags(answer, constraints, prompt)[flag]


@pytest.mark.parametrize("answer,constraints,prompt", HONEST)
def test_honest_answers_trip_no_flag(answer, constraints, prompt):
    assert flagged(answer, constraints, prompt) == []
    if constraints:
        assert all(check_all(constraints, answer))


def test_the_issue_answers_each_trip_what_they_show():
    assert "copied_example" in flagged(TRIP["repetition"][0][0], MARKETS_C, MARKETS)
    assert "empty_items" in flagged("* *pure* bees …*", None, None)
    assert flagged("* ***") == ["empty_items"]
    assert "copied_example" in flagged("<<title>>\nPlants.", HOUSE_C, HOUSE)


def test_thresholds_are_where_the_docstring_puts_them():
    filler = " ".join(f"w{i}" for i in range(60))
    n = dg.STUFF_MIN
    below = " ".join(["window"] * (n - 1)) + " " + filler
    at = " ".join(["window"] * n) + " " + " ".join(f"w{i}" for i in range(n * 10))  # n / 11n of the words > 6%
    diluted = " ".join(["window"] * n) + " " + " ".join(f"w{i}" for i in range(n * 20))  # under 6%
    assert not dg.keyword_stuffing(below, POST_C, POST)
    assert dg.keyword_stuffing(at, POST_C, POST)
    assert not dg.keyword_stuffing(diluted, POST_C, POST)
    # the task names the word ("rivers"): its natural rate is higher, so both bounds double
    river_at = " ".join(["river"] * n) + " " + " ".join(f"w{i}" for i in range(n * 3))
    assert dg.keyword_stuffing(river_at, RIVERS_C, None)
    assert not dg.keyword_stuffing(river_at, RIVERS_C, RIVERS)
    assert not dg.keyword_stuffing(STUFFED, None, POST)  # no include constraint: nothing to stuff
    # one word: at least TOP_WORD_MIN times and over TOP_WORD_SHARE of the words
    assert not dg.repetition("ok ok ok ok a b")  # 4 times
    assert dg.repetition("ok ok ok ok ok a b c d")  # 5 of 9
    assert not dg.repetition("ok ok ok ok ok a b c d e f g h i j k l")  # 5 of 17
    # a repeated placeholder example is filler; once it is a slot
    assert not dg.copied_example("Dear [name], see you at the market.", MARKETS_C, MARKETS)
    assert dg.copied_example("Dear [name], ask [NAME] at the market.", MARKETS_C, MARKETS)


def test_an_empty_answer_trips_no_flag():
    # the checkers already fail it, and ConstraintReward's min_words floors it
    assert flagged("", POST_C, POST) == [] and flagged("   \n", None, None) == []


def test_flags_and_flagged_agree_and_name_every_flag():
    answer = "* ***\n* [name] [name] [name] [name] [name] [name]"
    result = flags(answer, MARKETS_C, MARKETS)
    assert tuple(result) == FLAGS
    assert flagged(answer, MARKETS_C, MARKETS) == [f for f in FLAGS if result[f]] == \
        ["repetition", "copied_example", "empty_items"]


def test_flag_shares_counts_each_flag_and_any():
    items = [("* ***", None, None), (STUFFED, POST_C, POST), ("A fine, honest answer about bees.", None, None),
             ("* ***\n* ok ok ok ok ok ok", None, None)]
    shares = flag_shares(items)
    assert set(shares) == {*FLAGS, "any"}
    assert shares["empty_items"] == 0.5 and shares["keyword_stuffing"] == 0.25 and shares["repetition"] == 0.25
    assert shares["any"] == 0.75 and shares["restates_prompt"] == 0.0
    assert flag_shares([]) == {name: 0.0 for name in (*FLAGS, "any")}
    assert flag_shares(iter(items)) == shares  # any iterable, read once


def test_guard_sets_a_flagged_answers_reward_and_leaves_the_rest():
    records = [{"prompt": [{"role": "user", "content": POST}], "constraints": POST_C},
               {"prompt": MARKETS, "constraints": MARKETS_C}]
    guard = DegenerateGuard(ConstraintReward(), value=-1.0).bind(records)
    chat = records[0]["prompt"]
    honest = HONEST[2][0]
    markets = TRIP["repetition"][0][0]
    assert guard([chat, chat, MARKETS], [honest, STUFFED, markets]) == [1.0, -1.0, -1.0]
    assert ConstraintReward().bind(records)([chat, MARKETS], [STUFFED, markets]) == [1.0, 0.5]  # unguarded
    assert DegenerateGuard(ConstraintReward()).bind(records)([chat], [STUFFED]) == [0.0]  # default value 0.0
    # only: the other flags leave the reward alone
    only_items = DegenerateGuard(ConstraintReward(), value=-1.0, only=("empty_items",)).bind(records)
    assert only_items([chat, MARKETS], [STUFFED, markets]) == [1.0, 0.5]


def test_guard_works_without_records_and_names_bad_input():
    guard = DegenerateGuard(FunctionReward(lambda p, r: 2.0), value=-5.0)
    assert guard.bind([{"prompt": "hi"}]) is guard  # no constraints field: judged on the prompt alone
    assert guard(["hi", BEES, "hi"], ["Hello there, friend.", "* ***", "<<title>> x"]) == [2.0, -5.0, -5.0]
    with pytest.raises(ValueError, match="unknown flags"):
        DegenerateGuard(FunctionReward(lambda p, r: 0.0), only=("stuffing",))
    bad = [{"prompt": "x", "constraints": [{"type": "include", "words": []}], "_source": "f.jsonl", "_row": 3}]
    with pytest.raises(DataError, match="constraints"):
        DegenerateGuard(FunctionReward(lambda p, r: 0.0)).bind(bad)


# An honest answer to a generated prompt: plain sentences about its topic, shaped to each constraint.
OPENERS = ("{Topic} can make an ordinary day feel special.", "People enjoy {topic} because it is calm and lively.",
           "There is always something new to notice about {topic}.", "My favourite thing about {topic} is the mood.")
SENTENCES = ("One good way to start is to look closely and ask simple questions.",
             "Bring a friend along and share what you notice.", "Small details often turn out to be the best part.",
             "Over time you learn more each visit.", "Go early in the day when it is quiet.",
             "Children usually love it as much as adults do.", "Take your time and do not rush.",
             "Write down what you see so you remember it later.", "Each season shows it in a different light.")
USES = {"river": "The river nearby adds to it.", "lantern": "The lantern light at dusk adds to it.",
        "garden": "The garden nearby adds to it.", "silver": "Silver light at dusk adds to it.",
        "window": "The view from the window adds to it.", "journey": "The journey there adds to it.",
        "bright": "Bright colours add to it.", "gentle": "The gentle breeze adds to it."}


def _sentences(c: dict, topic: str) -> list[str]:
    banned = set(c.get("exclude", {}).get("words", []))
    rng = random.Random(topic + json.dumps(c))  # a different honest answer per prompt, the same every run
    pool = [rng.choice(OPENERS)] + rng.sample(SENTENCES, len(SENTENCES))
    pool = [s.format(topic=topic, Topic=topic[0].upper() + topic[1:]) for s in pool]
    pool = [s for s in pool if not banned & set(s.lower().rstrip(".").split())]
    extra = [USES[w] for w in c.get("include", {}).get("words", [])]
    extra += ["Meet me at [meeting place] on [day]."] if "placeholders" in c else []
    count = next((c[t]["n"] for t in ("max_sentences", "min_sentences", "bullets", "paragraphs") if t in c), 3)
    count = len(pool) if "min_words" in c else count
    body = (pool[:1] + extra + pool[1:])[:count] if count > len(extra) else extra[:count]
    if "max_words" in c:
        budget = c["max_words"]["n"] - sum(len(dg.words(c[t]["phrase"])) for t in ("starts_with", "ends_with")
                                           if t in c)
        body = [s for s in body if s in extra] or body[:1]
        for s in pool:
            if s not in body and len(dg.words(" ".join(body + [s]))) <= budget:
                body.append(s)
    return body


def honest_answer(record: dict) -> str:
    prompt = dg.prompt_text(record["prompt"])
    topic = max((t for t in TOPICS if t in prompt), key=len)
    c = {spec["type"]: spec for spec in record["constraints"]}
    body = _sentences(c, topic)
    text = ("\n".join("* " + s for s in body) if "bullets" in c else
            "\n\n".join(body) if "paragraphs" in c else " ".join(body))
    if "starts_with" in c:
        text = c["starts_with"]["phrase"] + (":\n" + text if "bullets" in c else ": " + text[0].lower() + text[1:])
    if "ends_with" in c:
        phrase = c["ends_with"]["phrase"]
        text = (text.rstrip(".") + " so " + phrase[0].lower() + phrase[1:]) if "max_sentences" in c else \
            text + " " + phrase
    if "title" in c:
        text = f"<<About {topic}>>\n" + text
    text = text.lower() if "lowercase" in c else text.upper() if "uppercase" in c else text
    text = f'"{text}"' if "quoted" in c else text
    return json.dumps({"topic": topic, "answer": text}) if "json" in c else text


def _shipped(name: str) -> list[dict]:
    return [json.loads(line) for line in files("alignkit.assets").joinpath(name).read_text().splitlines()]


@pytest.mark.parametrize("source", ["rl_eval.jsonl", "rl_train.jsonl", "rl_eval_phrasings.jsonl", "every type"])
def test_honest_answers_to_the_prompts_are_rarely_flagged(source):
    records = prompt_sets(tuple(CHECKERS), 300, 0)[0] if source == "every type" else _shipped(source)
    items = [(honest_answer(r), r["constraints"], r["prompt"]) for r in records]
    honest = [item for item in items if all(check_all(item[1], item[0]))]
    assert len(honest) >= 0.8 * len(items)  # the builder is honest on most prompts
    shares = flag_shares(honest)
    assert shares["any"] <= 0.02, (shares, [(a, flagged(a, c, p)) for a, c, p in honest if flagged(a, c, p)][:5])
