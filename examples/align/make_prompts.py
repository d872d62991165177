"""Writes src/alignkit/assets/align_prompts.jsonl (the main job's shipped prompts): everyday topics x a few phrasings, deterministic (rerun to regenerate)."""

import json
import random
from pathlib import Path

TOPICS = """rain, Mondays, traffic, homework, the dentist, coffee, winter, my neighbour, a long queue, a broken umbrella,
the weekend, a new job, public transport, cooking dinner, a rainy holiday, old friends, city noise, a power cut,
the gym, waking up early, a job interview, moving house, a flat tyre, exam season, the news, a crowded train,
a lost phone, a cold morning, online meetings, cleaning the kitchen, a late bus, paperwork, a hospital visit,
a long flight, grocery shopping, a delayed parcel, the weather, tax season, a noisy cafe, learning to drive,
a quiet evening, the first day of school, a small garden, a missed deadline, a power nap, a team project,
a second-hand bicycle, a library, a thunderstorm, a budget, an empty fridge, a wedding, a birthday,
a long walk, a mountain hike, a late night, a hot summer day, a snowstorm, a traffic jam, a new phone,
an old car, a recipe that failed, a bad haircut, a friend moving away, a rainy Sunday, a parking ticket,
a printer jam, a cancelled concert, a software update, a dentist appointment, a job rejection, a noisy neighbour,
a village market, a river, a museum, a train station, a football match, a board game, a piano lesson,
a history class, a science fair, a hospital waiting room, a marathon, a cat, a dog, a goldfish, a houseplant,
a sunrise, a sunset, an airport, a hotel room, a campsite, a beach in winter, a city at night, a quiet street,
a bakery, a bookshop, a laundromat, a bus stop, a long meeting, an inbox full of email, a slow computer""".replace("\n", " ")
PHRASINGS = [
    "Write one sentence about {}.",
    "Describe {} in one sentence.",
    "In one sentence, tell me what you think of {}.",
]


def main() -> None:
    topics = [t.strip() for t in TOPICS.split(",") if t.strip()]
    prompts = [p.format(t) for t in topics for p in PHRASINGS]
    random.Random(0).shuffle(prompts)
    path = Path(__file__).resolve().parents[2] / "src" / "alignkit" / "assets" / "align_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    print(f"{len(prompts)} prompts -> {path}")


if __name__ == "__main__":
    main()
