"""The IFEval-style pack: writing requests with verifiable instructions, made by a seeded generator.

google/IFEval itself is a hub dataset (no registry ships it), so the pack is made here instead, the way
IFEval's prompts were: a short writing task, then one to three instructions from IFEval's 25 kinds,
each worded by lm-eval's own checker (`build_description(**kwargs)`), with its arguments drawn from
sensible ranges and never two instructions that lm-eval's `INSTRUCTION_CONFLICTS` says contradict each
other. Every kind leads some prompts, so all 25 are in the pack. The file is in google/IFEval's layout
(key, prompt, instruction_id_list, kwargs), so the pack and the full set go through the same code.

The same seed gives the same bytes (the test rebuilds the pack and compares it with the committed one).
"""
from __future__ import annotations

import json
import os
import random

from qwen2.fileio import write_text_atomic

SEED = 20240715  # the Qwen2 report's date on arXiv
PROMPTS = 125
FIRST_KEY = 1000

# (the request, words that belong to its subject: keywords to include, repeat or avoid)
TASKS = (
    ("Write a short story about a lighthouse keeper who finds a message in a bottle.",
     ("lighthouse", "bottle", "storm", "message", "sea")),
    ("Write a product description for a solar-powered backpack aimed at hikers.",
     ("solar", "battery", "trail", "charge", "pocket")),
    ("Write a cover letter for a junior data analyst position at a hospital.",
     ("data", "patients", "analysis", "team", "hospital")),
    ("Explain to a ten-year-old why the sky is blue.",
     ("light", "sun", "colour", "air", "scatter")),
    ("Write a blog post about learning to bake sourdough bread at home.",
     ("starter", "flour", "oven", "dough", "crust")),
    ("Write a poem about the first snowfall of winter in a small town.",
     ("snow", "quiet", "street", "cold", "window")),
    ("Write a review of a fictional Italian restaurant called Nonna's Table.",
     ("pasta", "service", "dessert", "menu", "wine")),
    ("Write an email to your landlord asking for a leaking kitchen tap to be repaired.",
     ("tap", "kitchen", "repair", "water", "leak")),
    ("Summarise the causes of the French Revolution for a history class.",
     ("king", "taxes", "bread", "nobles", "revolution")),
    ("Write a speech for a high school graduation ceremony.",
     ("future", "friends", "teachers", "courage", "class")),
    ("Describe a typical day in the life of a beekeeper.",
     ("bees", "honey", "hive", "flowers", "queen")),
    ("Write a pitch for a mobile app that helps people drink enough water.",
     ("reminder", "hydration", "app", "habit", "water")),
    ("Write a limerick-style rhyme about a cat that refuses to get out of bed.",
     ("cat", "bed", "morning", "lazy", "nap")),
    ("Give advice to someone starting their first job as a software engineer.",
     ("code", "questions", "mentor", "review", "bugs")),
    ("Write a travel guide entry for a weekend in Lisbon.",
     ("tram", "pastries", "river", "hills", "museum")),
    ("Explain how a refrigerator keeps food cold.",
     ("heat", "compressor", "coolant", "door", "temperature")),
    ("Write a diary entry from the point of view of an astronaut on the Moon.",
     ("moon", "earth", "dust", "suit", "silence")),
    ("Write a persuasive essay arguing that cities should plant more trees.",
     ("trees", "shade", "air", "streets", "health")),
    ("Write a thank-you note to a neighbour who looked after your dog.",
     ("dog", "walks", "kindness", "neighbour", "treats")),
    ("Describe the rules of chess to someone who has never played.",
     ("king", "board", "pawn", "move", "checkmate")),
    ("Write a news report about a local library reopening after renovation.",
     ("library", "books", "readers", "mayor", "shelves")),
    ("Write a rap verse about recycling plastic.",
     ("plastic", "bin", "planet", "waste", "recycle")),
    ("Write a job advertisement for a night-shift baker.",
     ("bread", "shift", "ovens", "early", "bakery")),
    ("Explain the difference between weather and climate.",
     ("weather", "climate", "decades", "rain", "average")),
    ("Write a fairy tale about a dragon who is afraid of the dark.",
     ("dragon", "dark", "cave", "fire", "stars")),
    ("Write a summary of the benefits of regular exercise for older adults.",
     ("exercise", "balance", "heart", "walking", "strength")),
    ("Write an advertisement for a second-hand bicycle you are selling.",
     ("bicycle", "gears", "brakes", "price", "wheels")),
    ("Describe how to plan a vegetable garden in a small backyard.",
     ("soil", "tomatoes", "sunlight", "seeds", "garden")),
    ("Write a dialogue between two friends deciding which film to watch.",
     ("film", "comedy", "popcorn", "tickets", "cinema")),
    ("Write a short biography of a fictional inventor named Ada Brightwell.",
     ("inventor", "machine", "patent", "workshop", "idea")),
    ("Write a complaint letter to an airline about lost luggage.",
     ("luggage", "flight", "airline", "refund", "suitcase")),
    ("Explain why sleep matters for students during exam season.",
     ("sleep", "memory", "exams", "rest", "night")),
)

# First words for "paragraph N must start with word W" (lowercase: the checker lowercases them)
FIRST_WORDS = ("today", "however", "finally", "imagine", "first", "meanwhile", "remember", "sometimes",
               "yesterday", "overall", "unfortunately", "luckily")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?", "Let me know if you have additional questions.",
               "That is all for now.", "Peace out.", "See you soon.")

# Pairs the generator also keeps apart although lm-eval's table lets them meet: repeating a request
# breaks "no commas" or "wrap it in quotes" in the repeat itself, and section markers are matched
# case-sensitively ("Section 1"), which an all-lowercase or all-capitals reply cannot write.
EXTRA_CONFLICTS = {("combination:repeat_prompt", "punctuation:no_comma"),
                   ("combination:repeat_prompt", "startend:quotation"),
                   ("change_case:english_lowercase", "detectable_format:multiple_sections"),
                   ("change_case:english_capital", "detectable_format:multiple_sections")}

REPEAT = "combination:repeat_prompt"


def draw_kwargs(instruction: str, topic: tuple[str, ...], taken: set[str], rng: random.Random, ins) -> dict:
    """Arguments for one instruction, in the names its checker's `build_description` takes; `taken`
    holds the subject words other instructions of the prompt already use (never both asked and forbidden)."""
    relation = lambda: rng.choice(ins._COMPARISON_RELATION)  # noqa: E731
    free = [w for w in topic if w not in taken]
    if instruction == "change_case:capital_word_frequency":
        return {"capital_frequency": rng.randint(2, 12), "capital_relation": relation()}
    if instruction == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.randint(1, 4)}
    if instruction == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(ins._POSTSCRIPT_MARKER)}
    if instruction == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(ins._SECTION_SPLITER), "num_sections": rng.randint(2, 5)}
    if instruction == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.randint(2, 6)}
    if instruction == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 4)}
    if instruction == "keywords:existence":
        words = sorted(rng.sample(free, 2))
        taken.update(words)
        return {"keywords": words}
    if instruction == "keywords:forbidden_words":
        words = sorted(rng.sample(free, 2))
        taken.update(words)
        return {"forbidden_words": words}
    if instruction == "keywords:frequency":
        word = rng.choice(free)
        taken.add(word)
        return {"keyword": word, "frequency": rng.randint(2, 5), "relation": relation()}
    if instruction == "keywords:letter_frequency":
        return {"letter": rng.choice("abcdefghijklmnopqrstuvwxyz"), "let_frequency": rng.randint(3, 12),
                "let_relation": relation()}
    if instruction == "language:response_language":
        # the checker's own table of languages (langdetect's codes), English aside: the request is English
        return {"language": rng.choice(sorted(code for code in ins._LANGUAGES if code != "en"))}
    if instruction == "length_constraints:nth_paragraph_first_word":
        paragraphs = rng.randint(2, 5)
        return {"num_paragraphs": paragraphs, "nth_paragraph": rng.randint(1, paragraphs),
                "first_word": rng.choice(FIRST_WORDS)}
    if instruction == "length_constraints:number_paragraphs":
        return {"num_paragraphs": rng.randint(2, 5)}
    if instruction == "length_constraints:number_sentences":
        return {"num_sentences": rng.randint(3, 15), "relation": relation()}
    if instruction == "length_constraints:number_words":
        return {"num_words": rng.choice((50, 80, 100, 120, 150, 200, 250, 300)), "relation": relation()}
    if instruction == "startend:end_checker":
        return {"end_phrase": rng.choice(END_PHRASES)}
    return {}  # the instructions that take no arguments (and repeat_prompt, filled in once the prompt is known)


def conflicts(a: str, b: str, table: dict) -> bool:
    """lm-eval's table lists each conflict under one of the two ids only: read it both ways."""
    return (a == b or b in table.get(a, ()) or a in table.get(b, ())
            or (a, b) in EXTRA_CONFLICTS or (b, a) in EXTRA_CONFLICTS)


def make_prompt(key: int, lead: str, rng: random.Random, registry, ins) -> dict:
    """One record: a task, the `lead` instruction and up to two more that conflict with nothing chosen."""
    request, topic = rng.choice(TASKS)
    everything = sorted(registry.INSTRUCTION_DICT)
    chosen = [lead]
    for _ in range(rng.choice((0, 1, 1, 2))):
        options = [i for i in everything if not any(conflicts(i, c, registry.INSTRUCTION_CONFLICTS) for c in chosen)]
        if options:
            chosen.append(rng.choice(options))
    # the request to repeat is all the text before the repeat instruction: put that one last
    chosen.sort(key=lambda i: i == REPEAT)
    taken: set[str] = set()
    kwargs = [draw_kwargs(i, topic, taken, rng, ins) for i in chosen]
    parts = [request]
    for instruction, args in zip(chosen, kwargs):
        if instruction == REPEAT:
            args["prompt_to_repeat"] = " ".join(parts)
        parts.append(registry.INSTRUCTION_DICT[instruction](instruction).build_description(**args))
    return {"key": key, "prompt": " ".join(parts), "instruction_id_list": chosen, "kwargs": kwargs}


def generate(seed: int = SEED, prompts: int = PROMPTS) -> list[dict]:
    """The pack's records: prompt i leads with the (i mod 25)-th instruction kind, in a seeded order."""
    from qwen2.eval.ifeval import instruction_registry

    registry = instruction_registry()
    from lm_eval.tasks.ifeval import instructions as ins

    rng = random.Random(seed)
    kinds = sorted(registry.INSTRUCTION_DICT)
    rng.shuffle(kinds)
    return [make_prompt(FIRST_KEY + n, kinds[n % len(kinds)], rng, registry, ins) for n in range(prompts)]


def build(packs_dir: str) -> list[str]:
    path = os.path.join(packs_dir, "ifeval.jsonl")
    os.makedirs(packs_dir, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate()))
    return [path]
