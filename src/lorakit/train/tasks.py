"""The built-in task `lorakit train` learns when given no data: reverse a short list of words.

    prompt:     "Reverse the order of the words: tiger lamp honey ocean\nAnswer:"
    completion: " ocean honey lamp tiger"

Generated from a seed (no download), with disjoint train and held-out splits. The instruction is
in the prompt, so the base model gets a fair try; a 135M model cannot do it zero-shot (it
rambles or copies), yet the rule is simple and exact, so a short LoRA run learns it and exact-match
accuracy on held-out word lists (combinations never seen in training) shows it plainly.
"""

from __future__ import annotations

import random

WORDS = tuple(
    """apple river stone cloud tiger green lamp piano honey rocket window forest candle silver ocean
    pepper garden mirror violin dragon castle butter winter summer button camera pencil rabbit island
    yellow orange purple basket ladder tunnel bridge market planet wizard cookie spider jacket kettle
    helmet carpet anchor saddle turtle falcon copper marble pillow bottle hammer lemon cherry feather
    blanket compass lantern meadow pirate rocket sugar thunder valley wagon zebra bucket circus dinner
    engine frost guitar harbor iron jungle kitten lizard magnet nickel oyster parrot quilt robot
    shadow tomato umbrella velvet walnut ribbon desert canyon glacier muffin noodle pebble puzzle
    scooter teapot tulip whistle acorn badger cactus donkey eagle fossil goblin hazel igloo jelly""".split()
)
WORDS = tuple(dict.fromkeys(WORDS))  # drop repeats, keep order

NAME = "reverse-words"
INSTRUCTION = "Reverse the order of the words: "


def example(words: list[str]) -> dict[str, str]:
    """One prompt/completion record for a word list."""
    return {"prompt": f"{INSTRUCTION}{' '.join(words)}\nAnswer:", "completion": " " + " ".join(reversed(words))}


def generate(seed: int = 0, n_train: int = 800, n_eval: int = 100) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) records, deterministic from `seed`; no word list appears in both."""
    rng = random.Random(f"lorakit-{NAME}-{seed}")
    seen: set[tuple[str, ...]] = set()
    records = []
    while len(records) < n_train + n_eval:
        words = tuple(rng.sample(WORDS, rng.randint(3, 4)))
        if words not in seen:
            seen.add(words)
            records.append(example(list(words)))
    return records[:n_train], records[n_train:]


def exact_match(prediction: str, answer: str) -> bool:
    """The metric: the generated text (up to end of sequence or line) equals the answer."""
    from .metrics import whole_completion_match

    return whole_completion_match(prediction, answer)
