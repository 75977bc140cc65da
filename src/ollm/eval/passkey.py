"""Passkey retrieval: a number hidden at a given depth of long filler text, asked for at the end
(exact match of the greedy answer); the multi-key variant hides several named keys and asks for
one of them."""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
_NAMES = ("red", "blue", "green", "gold", "silver")


@dataclass
class PasskeyRow:
    """Accuracy of one (context, depth, variant) cell over its trials."""

    context: int
    depth: float  # where the key sits, as a fraction of the filler
    variant: str  # "single" or "multi"
    trials: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "accuracy": self.accuracy}


PARTS = ("intro", "before", "facts", "after", "question")  # the parts of a passkey prompt


def build_prompt(
    tokenizer, context: int, depth: float, keys: dict[str, int], ask: str
) -> tuple[str, int]:
    """A prompt of about ``context`` tokens with the keys inserted at ``depth``; returns the
    prompt and the expected answer. One key is phrased as the classic single passkey."""
    parts, want = build_parts(tokenizer, context, depth, keys, ask)
    return "".join(parts.values()), want


def build_parts(
    tokenizer, context: int, depth: float, keys: dict[str, int], ask: str
) -> tuple[dict[str, str], int]:
    """``build_prompt``'s prompt as its named ``PARTS`` (joined: the prompt) and the answer."""
    if len(keys) == 1:
        facts = f"The pass key is {keys[ask]}. Remember it. {keys[ask]} is the pass key.\n"
        question = "\nWhat is the pass key? The pass key is"
    else:
        facts = "".join(f"The pass key for {n} is {k}. Remember it.\n" for n, k in keys.items())
        question = f"\nWhat is the pass key for {ask}? The pass key for {ask} is"
    fixed = len(tokenizer(_INTRO + facts + question)["input_ids"])
    per = len(tokenizer(_FILLER, add_special_tokens=False)["input_ids"])
    reps = max(1, (context - fixed) // per)
    before = round(reps * depth)
    texts = (_INTRO, _FILLER * before, facts, _FILLER * (reps - before), question)
    return dict(zip(PARTS, texts, strict=True)), keys[ask]


def marked(parts: dict[str, str], full: str | None):
    """The prompt for ``LLM.generate``: the joined text, or with ``full`` (a part's name) the
    parts with that one marked full (routing by segment; the same tokens)."""
    if full is None:
        return "".join(parts.values())
    if full not in parts:
        raise ValueError(f"no passkey prompt part {full!r}; one of {', '.join(parts)}")
    return [(text, "full" if name == full else "routed") for name, text in parts.items()]


def run_passkey(
    llm,
    contexts: list[int],
    depths: list[float],
    trials: int = 1,
    variants: tuple[str, ...] = ("single", "multi"),
    seed: int = 0,
    costs: list | None = None,
    full: str | None = None,
) -> list[PasskeyRow]:
    """Greedy answers of ``llm`` to passkey prompts; a trial is correct when the first number
    in the answer equals the hidden key. Each answer's cost per token goes to ``costs``.
    ``full`` marks one of the prompt's ``PARTS`` full (routing by segment): "question" as a
    user would, "facts" as an oracle (where the keys are) that checks the reads reach them."""
    from ollm.engine.sampling import SamplingParams

    if full is not None and full not in PARTS:
        raise ValueError(f"no passkey prompt part {full!r}; one of {', '.join(PARTS)}")

    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    rows = []
    for context in contexts:
        for depth in depths:
            for variant in variants:
                correct = 0
                for _ in range(trials):
                    n = 1 if variant == "single" else 3
                    names = rng.sample(_NAMES, n)
                    keys = {name: rng.randint(10000, 99999) for name in names}
                    ask = rng.choice(names)
                    parts, want = build_parts(llm.tokenizer, context, depth, keys, ask)
                    res = llm.generate(marked(parts, full), params)
                    answer = res.text
                    if costs is not None:
                        costs.append(res.metrics.cost_per_token)
                    got = re.search(r"\d+", answer)
                    correct += bool(got and int(got.group()) == want)
                rows.append(PasskeyRow(context, depth, variant, trials, correct))
    return rows
