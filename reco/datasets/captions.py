"""Web-like alt-text for labelled images (no captions ship with the image datasets here).

Each caption combines a template and a synonym of the class name; a configurable fraction is
noise, as on the web: a caption of another class (wrong) or one unrelated to any class
(irrelevant). The generator is seeded, and it reports which captions are noise, so experiments
can measure how robust a method is to a noisy memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FASHION_SYNONYMS: dict[str, list[str]] = {
    "T-shirt/top": ["t-shirt", "tee", "top", "short-sleeve shirt"],
    "Trouser": ["trousers", "pants", "jeans", "slacks"],
    "Pullover": ["pullover", "sweater", "jumper", "knit sweater"],
    "Dress": ["dress", "summer dress", "gown", "frock"],
    "Coat": ["coat", "jacket", "overcoat", "parka"],
    "Sandal": ["sandal", "sandals", "flip-flops", "strappy sandal"],
    "Shirt": ["shirt", "button-up shirt", "blouse", "dress shirt"],
    "Sneaker": ["sneaker", "trainers", "running shoe", "sports shoe"],
    "Bag": ["bag", "handbag", "purse", "tote bag"],
    "Ankle boot": ["ankle boot", "boots", "chelsea boot", "booties"],
}

DIGIT_SYNONYMS: dict[str, list[str]] = {
    str(d): [str(d), w, f"number {d}", f"digit {w}"]
    for d, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
}

TEMPLATES = [
    "{}",
    "a photo of a {}",
    "{} for sale",
    "new {} in stock, free shipping",
    "my favourite {}",
    "close-up of the {}",
    "buy this {} online",
    "a black and white picture of a {}",
    "{} - best price",
    "image of a {} on a plain background",
]

IRRELEVANT = [
    "click here for more",
    "untitled",
    "IMG_2034.jpg",
    "summer holiday 2019",
    "thumbnail",
    "logo",
    "our team at the office",
    "lorem ipsum dolor sit amet",
]


@dataclass(frozen=True)
class CaptionNoise:
    wrong: float = 0.0  # fraction of captions naming another class
    irrelevant: float = 0.0  # fraction of captions about nothing

    def __post_init__(self) -> None:
        if self.wrong < 0 or self.irrelevant < 0 or self.wrong + self.irrelevant > 1:
            raise ValueError(f"noise fractions must be >= 0 and sum to <= 1, got {self}")


def generate_captions(
    labels: np.ndarray,
    class_names: list[str],
    synonyms: dict[str, list[str]],
    noise: CaptionNoise = CaptionNoise(),
    seed: int = 0,
) -> tuple[list[str], np.ndarray]:
    """(captions, kind) for items with the given labels; kind[i] is 0 for a correct caption, 1
    for a wrong class, 2 for an irrelevant one."""
    missing = [n for n in class_names if n not in synonyms]
    if missing:
        raise ValueError(f"no synonyms for classes {missing}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    u = rng.random(len(labels))
    kind = np.where(u < noise.wrong, 1, np.where(u < noise.wrong + noise.irrelevant, 2, 0))
    captions = []
    for lab, k in zip(labels, kind):
        if k == 2:
            captions.append(str(rng.choice(IRRELEVANT)))
            continue
        c = int(lab)
        if k == 1:
            c = int(rng.choice([x for x in range(len(class_names)) if x != c]))
        word = str(rng.choice(synonyms[class_names[c]]))
        captions.append(str(rng.choice(TEMPLATES)).format(word))
    return captions, kind
