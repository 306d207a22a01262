"""Template families that generate datasets of prompt pairs with named positions (deterministic per seed).

- IOI (Wang et al. 2022): "When {A} and {B} went to the store, {B} gave a drink to" -> answer A (the indirect
  object, IO), wrong B (the subject, S). ABBA puts IO first, BABA the subject first. The corruption is the
  paper's ABC dataset: the three name slots get three other, distinct names, so nothing in the corrupted
  prompt points to A or B. Positions: IO, S1, S2, END.
- greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> answers: every
  two-digit year above 32; wrong: 00 to 32 (lists of tokens, compared by log-sum-exp). The corruption sets the
  first year's last two digits to 01. Positions: YY, END.
- factual recall: a user table of (subject, attribute) rows and a template with {SUBJECT}; the corrupted
  prompt uses another subject with another attribute, which is the wrong answer. Positions: SUBJECT, END.

Positions are character spans in each prompt; `datasets.tokenize_dataset` maps them to token indices, so pairs
of different token lengths still line up by role.
"""
from __future__ import annotations

import random
import re

from desktop_app.engine.datasets import PairDataset, PairText
from desktop_app.engine.errors import SpecError

DEFAULT_NAMES = ("Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Laura", "Peter",
                 "Anna", "Tom", "Kate", "Mark", "Lucy", "Paul", "Clara", "Henry", "Julia", "Simon")
DEFAULT_PLACES = ("store", "park", "school", "beach", "office", "market", "garden", "station")
DEFAULT_OBJECTS = ("a drink", "a book", "a ring", "a snack", "a letter", "a flower", "a gift", "a pen")
# {N1} / {N2}: the two names of the first clause (ABBA: IO then S; BABA: S then IO); {S2}: the subject again.
IOI_TEMPLATES = (
    "When {N1} and {N2} went to the {PLACE}, {S2} gave {OBJECT} to",
    "After {N1} and {N2} arrived at the {PLACE}, {S2} handed {OBJECT} to",
    "While {N1} and {N2} were at the {PLACE}, {S2} passed {OBJECT} to",
    "Then {N1} and {N2} walked to the {PLACE}, and {S2} gave {OBJECT} to",
)
GREATER_THAN_NOUNS = ("war", "expedition", "drought", "reign", "strike", "voyage", "famine", "siege")
GREATER_THAN_TEMPLATE = "The {NOUN} lasted from the year {XX}{YY} to the year {XX}"
FACTUAL_TEMPLATE = "{SUBJECT} is located in the country of"
FAMILIES = ("ioi", "greater_than", "factual")

_FIELD = re.compile(r"\{([A-Z0-9_]+)\}")


def fill(template: str, values: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """The filled text and the character span of each field's (first) occurrence."""
    out, spans, at = [], {}, 0
    last = 0
    for m in _FIELD.finditer(template):
        out.append(template[last:m.start()])
        at += m.start() - last
        name = m.group(1)
        if name not in values:
            raise SpecError(f"the template {template!r} uses {{{name}}}, which this family does not fill; "
                            f"use {', '.join('{' + k + '}' for k in values)}.")
        value = values[name]
        spans.setdefault(name, (at, at + len(value)))
        out.append(value)
        at += len(value)
        last = m.end()
    out.append(template[last:])
    return "".join(out), spans


def _distinct(n: int, rng: random.Random, make, what: str) -> list[PairText]:
    if n < 1:
        raise SpecError(f"the number of pairs must be at least 1, not {n}.")
    pairs, seen = [], set()
    for _ in range(n * 50):
        if len(pairs) == n:
            break
        pair = make(rng)
        key = (pair.clean, pair.corrupted)
        if key not in seen:
            seen.add(key)
            pairs.append(pair)
    if len(pairs) < n:
        raise SpecError(f"the {what} template gives only {len(pairs)} different pairs; ask for fewer or add "
                        "more names, nouns or rows.")
    return pairs


def ioi_pairs(n: int, seed: int = 0, order: str = "mixed", names=DEFAULT_NAMES, templates=IOI_TEMPLATES,
              places=DEFAULT_PLACES, objects=DEFAULT_OBJECTS) -> PairDataset:
    """`n` IOI pairs with the ABC corruption; order "ABBA", "BABA" or "mixed" (each pair picks one)."""
    if order not in ("ABBA", "BABA", "mixed"):
        raise SpecError(f"order must be ABBA, BABA or mixed, not {order!r}.")
    names = list(dict.fromkeys(str(x) for x in names))  # a repeated name must not fill two roles of one pair
    if len(names) < 5:
        raise SpecError("the IOI template needs at least 5 different names (2 for the prompt, 3 for its ABC "
                        "corruption).")

    def make(rng):
        io, s, c_io, c_s1, c_s2 = rng.sample(names, 5)
        template = rng.choice(templates)
        abba = order == "ABBA" or (order == "mixed" and rng.random() < 0.5)
        shared = dict(PLACE=rng.choice(places), OBJECT=rng.choice(objects))
        pattern = template.replace("{N1}", "{IO}" if abba else "{S1}").replace("{N2}", "{S1}" if abba else "{IO}")
        clean, cs = fill(pattern, dict(IO=io, S1=s, S2=s, **shared))
        corrupted, ks = fill(pattern, dict(IO=c_io, S1=c_s1, S2=c_s2, **shared))
        spans = tuple((role, cs[role], ks[role]) for role in ("IO", "S1", "S2"))
        return PairText(clean, corrupted, " " + io, " " + s, spans)
    return PairDataset(_distinct(n, random.Random(seed), make, "IOI"))


def greater_than_pairs(n: int, seed: int = 0, nouns=GREATER_THAN_NOUNS, centuries=("11", "12", "13", "14", "15",
                       "16", "17"), template: str = GREATER_THAN_TEMPLATE) -> PairDataset:
    """`n` greater-than pairs: answers are the two-digit years above YY, wrong ones 00..YY; corruption YY = 01."""

    def make(rng):
        yy = rng.randint(2, 98)
        values = dict(NOUN=rng.choice(nouns), XX=rng.choice(centuries))
        clean, cs = fill(template, dict(YY=f"{yy:02d}", **values))
        corrupted, ks = fill(template, dict(YY="01", **values))
        answer = tuple(f"{y:02d}" for y in range(yy + 1, 100))
        wrong = tuple(f"{y:02d}" for y in range(0, yy + 1))
        return PairText(clean, corrupted, answer if len(answer) > 1 else answer[0],
                        wrong if len(wrong) > 1 else wrong[0], (("YY", cs["YY"], ks["YY"]),))
    return PairDataset(_distinct(n, random.Random(seed), make, "greater-than"))


def factual_pairs(n: int, table, seed: int = 0, template: str = FACTUAL_TEMPLATE) -> PairDataset:
    """`n` pairs from rows (subject, attribute): the corruption is another subject whose attribute differs."""
    rows = [(str(s), str(a)) for s, a in table]
    if "{SUBJECT}" not in template:
        raise SpecError("the factual template must contain {SUBJECT}, e.g. \"{SUBJECT} is located in the country of\".")
    if len({a for _, a in rows}) < 2:
        raise SpecError("the factual table needs rows with at least two different attributes.")

    def make(rng):
        subject, attribute = rng.choice(rows)
        other, other_attribute = rng.choice([r for r in rows if r[1] != attribute])
        clean, cs = fill(template, dict(SUBJECT=subject))
        corrupted, ks = fill(template, dict(SUBJECT=other))
        return PairText(clean, corrupted, " " + attribute, " " + other_attribute,
                        (("SUBJECT", cs["SUBJECT"], ks["SUBJECT"]),))
    return PairDataset(_distinct(n, random.Random(seed), make, "factual"))


def generate(family: str, n: int, seed: int = 0, **options) -> PairDataset:
    if family == "ioi":
        return ioi_pairs(n, seed, **options)
    if family == "greater_than":
        return greater_than_pairs(n, seed, **options)
    if family == "factual":
        return factual_pairs(n, seed=seed, **options)
    raise SpecError(f"unknown template family {family!r}; choose one of {', '.join(FAMILIES)}.")
