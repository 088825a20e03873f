"""Templates and word lists of the demo's instruction tasks.

Short factual and transform tasks a model of a few hundred thousand parameters can learn: each
answer follows from the prompt by a fixed rule or a small table of facts, so a good teacher is
possible and a student can be seen to improve. Rows are Dolly-format dicts.
"""

from __future__ import annotations

import random
from collections.abc import Callable

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Cuba": "Havana",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Australia": "Canberra",
}

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "high": "low",
    "young": "old",
    "strong": "weak",
    "rich": "poor",
    "open": "closed",
    "full": "empty",
    "hard": "soft",
    "wet": "dry",
    "loud": "quiet",
    "thick": "thin",
    "near": "far",
    "clean": "dirty",
    "long": "short",
    "heavy": "light",
    "true": "false",
    "inside": "outside",
    "up": "down",
    "first": "last",
}

COLORS = {
    "banana": "yellow",
    "lemon": "yellow",
    "tomato": "red",
    "strawberry": "red",
    "cherry": "red",
    "lime": "green",
    "cucumber": "green",
    "leaf": "green",
    "carrot": "orange",
    "pumpkin": "orange",
    "orange": "orange",
    "plum": "purple",
    "grape": "purple",
    "sky": "blue",
    "ocean": "blue",
    "snow": "white",
    "cloud": "white",
    "coal": "black",
    "crow": "black",
    "chocolate": "brown",
}

SOUNDS = {
    "dog": "woof",
    "cat": "meow",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "owl": "hoot",
    "lion": "roar",
    "horse": "neigh",
    "frog": "croak",
    "bee": "buzz",
    "snake": "hiss",
    "mouse": "squeak",
    "crow": "caw",
}

PLURALS = {
    "cat": "cats",
    "dog": "dogs",
    "box": "boxes",
    "city": "cities",
    "child": "children",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "man": "men",
    "woman": "women",
    "leaf": "leaves",
    "knife": "knives",
    "bus": "buses",
    "baby": "babies",
    "apple": "apples",
    "house": "houses",
    "fish": "fish",
    "sheep": "sheep",
    "goose": "geese",
    "party": "parties",
    "wolf": "wolves",
    "glass": "glasses",
}

NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
]

NOUNS = sorted(
    {*COLORS, *SOUNDS, "tree", "river", "stone", "chair", "book", "lamp", "door", "bread", "milk"}
)


def _row(instruction: str, response: str, context: str = "") -> dict[str, str]:
    return {"instruction": instruction, "context": context, "response": response}


def _capital(rng: random.Random) -> dict[str, str]:
    country = rng.choice(sorted(CAPITALS))
    template = rng.choice(
        [
            "What is the capital of {}?",
            "Name the capital city of {}.",
            "Which city is the capital of {}?",
        ]
    )
    return _row(template.format(country), f"The capital of {country} is {CAPITALS[country]}.")


def _opposite(rng: random.Random) -> dict[str, str]:
    word = rng.choice(sorted(OPPOSITES))
    template = rng.choice(["What is the opposite of {}?", "Give the antonym of the word {}."])
    return _row(template.format(word), f"The opposite of {word} is {OPPOSITES[word]}.")


def _color(rng: random.Random) -> dict[str, str]:
    thing = rng.choice(sorted(COLORS))
    template = rng.choice(["What color is a {}?", "Tell me the usual color of a {}."])
    return _row(template.format(thing), f"A {thing} is usually {COLORS[thing]}.")


def _sound(rng: random.Random) -> dict[str, str]:
    animal = rng.choice(sorted(SOUNDS))
    template = rng.choice(["What sound does a {} make?", "How does a {} sound?"])
    return _row(template.format(animal), f"A {animal} says {SOUNDS[animal]}.")


def _plural(rng: random.Random) -> dict[str, str]:
    noun = rng.choice(sorted(PLURALS))
    template = rng.choice(["What is the plural of {}?", "Write the plural form of the word {}."])
    return _row(template.format(noun), f"The plural of {noun} is {PLURALS[noun]}.")


def _add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    template = rng.choice(["What is {} plus {}?", "Add {} and {}."])
    return _row(
        template.format(NUMBER_WORDS[a], NUMBER_WORDS[b]),
        f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.".capitalize(),
    )


def _reverse(rng: random.Random) -> dict[str, str]:
    words = rng.sample(NOUNS, rng.randint(2, 4))
    return _row(
        "Reverse the order of these words.", " ".join(reversed(words)), context=" ".join(words)
    )


def _count(rng: random.Random) -> dict[str, str]:
    words = rng.choices(NOUNS, k=rng.randint(1, 6))
    count = len(words)
    noun = "word" if count == 1 else "words"
    return _row(
        "How many words are in this list?",
        f"There {'is' if count == 1 else 'are'} {NUMBER_WORDS[count]} {noun}.",
        context=" ".join(words),
    )


def _first(rng: random.Random) -> dict[str, str]:
    words = rng.sample(NOUNS, rng.randint(2, 5))
    return _row(
        "What is the first word of this list?", f"The first word is {words[0]}.", " ".join(words)
    )


TASKS: tuple[Callable[[random.Random], dict[str, str]], ...] = (
    _capital,
    _opposite,
    _color,
    _sound,
    _plural,
    _add,
    _reverse,
    _count,
    _first,
)


def generate_rows(count: int, seed: int) -> list[dict[str, str]]:
    """`count` rows, the tasks in equal shares, the same rows for the same seed."""
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(count)]
