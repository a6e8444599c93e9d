"""The semantic tier's guard: refuse a close match that differs in what changes the answer.

An embedding puts "what is 2+2" and "what is 2+3", or "is X safe" and "is X
not safe", close together: the words that carry the difference are few.
So a candidate above the similarity threshold must also agree with the
query on the features below, extracted from each prompt's text:

- ``numbers``: digits (``3.11``, ``1,000``, ``2``) and number words
  (``three``, ``twelfth``, ``half``), as the set of values written;
- ``negation``: how many negations the text holds (``not``, ``n't``,
  ``no``, ``never``, ``without``, ``cannot``...): "is" vs "isn't" differs,
  "isn't" vs "is not" does not;
- ``quotes``: the exact text inside quotes and backticks;
- ``identifiers``: code-like tokens (``snake_case``, ``camelCase``,
  ``file.py``, ``os.path``, ``--flag``, ``f()``, paths), case-sensitive;
- ``entities``: names, as capitalised words inside a sentence, acronyms,
  and any phrase of the shipped gazetteer (``data/entities.txt``: countries,
  cities, companies, languages, tools...) even when typed in lowercase or
  at the start of a sentence. A name of one prompt that the other prompt
  also contains, in whatever case, is no difference ("Explain Python's GIL"
  vs "explain the GIL in python").

Features are computed once per prompt, so a stored entry carries its own
and a lookup compares them. The guard is a
heuristic: it is measured (``loadtest/bench_semantic.py``) for the pairs it
wrongly lets through and the paraphrases it refuses.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Any


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Digits count inside words too: "v1.5.0" vs "v1.6.0", "python3.11" vs "python3.12".
_NUMBER = re.compile(r"(?<![\d.])[-+]?\d+(?:[.,]\d+)*(?:\.\d+)?%?")
_NUMBER_WORDS = _wordset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
hundred thousand million billion trillion first second third fourth fifth sixth seventh
eighth ninth tenth eleventh twelfth twentieth hundredth half quarter twice thrice double
triple dozen once
""")
_NEGATIONS = _wordset("""
not no never none nobody nothing nowhere neither nor without cannot cant dont doesnt didnt
isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt neednt
""")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_QUOTED = re.compile(
    "\"([^\"\n]{1,300})\"|\u201c([^\u201d\n]{1,300})\u201d"
    r"|`+([^`\n]{1,300}?)`+"
    r"|(?<![\w'])'([^'\n]{1,300})'(?![\w'])")
_IDENTIFIER = re.compile(
    r"(?:(?<![\w-])--?[A-Za-z][\w-]*)"                       # --flag, -v
    r"|(?:[A-Za-z_$][\w$]*(?:(?:\.|::|->|/)[A-Za-z_$][\w$]*)+(?:\(\))?)"  # a.b, a::b, a/b
    r"|(?:[A-Za-z_$]*_[\w$]*)"                       # snake_case, _private, UPPER_CASE
    r"|(?:[a-z]+[A-Z][\w$]*)"                        # camelCase
    r"|(?:[A-Za-z_$][\w$]*\(\))"                     # call()
    r"|(?:[A-Za-z]+\d[\w]*)")                        # md5, v2, utf8, x86_64
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]\s*|[\"“(]\s*)$")
_GAZETTEER_MAX_WORDS = 4
_PRONOUN_I = frozenset({"i", "i'm", "i've", "i'd", "i'll"})


def _load_gazetteer() -> frozenset[str]:
    text = resources.files("proxy.cache").joinpath("data/entities.txt").read_text("utf-8")
    return frozenset(line.strip() for line in text.splitlines()
                     if line.strip() and not line.startswith("#"))


@dataclass(frozen=True, slots=True)
class Features:
    """What a prompt must share with another for one to answer the other.

    Numbers, quotes and identifiers are sorted multisets: "created_at, then
    updated_at, then created_at" differs from the same names in other counts.
    ``words`` (the lowercased words) lets a name in one prompt be looked for
    anywhere in the other, whatever its case there.
    """

    numbers: tuple[str, ...]
    negations: int
    quotes: tuple[str, ...]
    identifiers: tuple[str, ...]
    entities: frozenset[str]
    words: frozenset[str]

    def to_wire(self) -> list[Any]:
        """A compact JSON-able form, for the Redis stream that feeds other replicas."""
        return [list(self.numbers), self.negations, list(self.quotes), list(self.identifiers),
                sorted(self.entities), sorted(self.words)]

    @classmethod
    def from_wire(cls, value: Any) -> Features:
        """The inverse of :meth:`to_wire` (raises ValueError on a malformed value)."""
        if not isinstance(value, list) or len(value) != 6 or not isinstance(value[1], int):
            raise ValueError("malformed guard features")
        lists = [value[0], value[2], value[3], value[4], value[5]]
        if not all(isinstance(x, list) and all(isinstance(i, str) for i in x) for x in lists):
            raise ValueError("malformed guard features")
        return cls(tuple(value[0]), value[1], tuple(value[2]), tuple(value[3]),
                   frozenset(value[4]), frozenset(sys.intern(w) for w in value[5]))


class Guard:
    """Extracts :class:`Features` and says why two prompts must not share an answer."""

    def __init__(self, gazetteer: frozenset[str] | None = None, *, enabled: bool = True) -> None:
        self.gazetteer = _load_gazetteer() if gazetteer is None else gazetteer
        self.enabled = enabled  # off: features are still extracted, nothing is refused
        self.refusals: dict[str, int] = {}

    def features(self, text: str) -> Features:
        """The features of one prompt's text."""
        text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
        quotes = sorted(next(g for g in m.groups() if g is not None)
                        for m in _QUOTED.finditer(text))
        identifiers = sorted(m.group(0).rstrip(".") for m in _IDENTIFIER.finditer(text)
                             if not _is_plain_abbreviation(m.group(0)))
        numbers = [m.group(0).replace(",", "").rstrip("%").lstrip("+")
                   for m in _NUMBER.finditer(text)]
        words = _WORD.findall(text)
        lowered = [w.lower() for w in words]
        negations = 0
        for word in lowered:
            if word in _NUMBER_WORDS:
                numbers.append(word)
            if word.replace("'", "") in _NEGATIONS or word.endswith("n't"):
                negations += 1
        return Features(tuple(sorted(numbers)), negations, tuple(quotes), tuple(identifiers),
                        frozenset(self._entities(text, words, lowered)),
                        # Interned: common words are then shared by every stored entry.
                        frozenset(sys.intern(w.split("'")[0]) for w in lowered))

    def _entities(self, text: str, words: list[str], lowered: list[str]) -> set[str]:
        found: set[str] = set()
        pos = 0
        for word, low in zip(words, lowered, strict=True):
            at = text.find(word, pos)
            pos = at + len(word)
            if not word[0].isupper() or low in _PRONOUN_I:
                continue
            if len(word) > 1 and word.isupper():
                found.add(low)  # an acronym
            elif not _SENTENCE_START.search(text, 0, at):
                found.add(low.split("'")[0])  # capitalised inside a sentence; "Python's": Python
        gazetteer = self.gazetteer
        for n in range(1, _GAZETTEER_MAX_WORDS + 1):
            for i in range(len(lowered) - n + 1):
                phrase = " ".join(lowered[i:i + n])
                if phrase in gazetteer:
                    found.add(phrase)
                elif n == 1 and phrase.endswith("'s") and phrase[:-2] in gazetteer:
                    found.add(phrase[:-2])
        return found

    def refuses(self, query: Features, candidate: Features) -> str | None:
        """The first feature on which the two differ (None: the candidate may answer)."""
        if not self.enabled:
            return None
        reason = None
        if query.numbers != candidate.numbers:
            reason = "number"
        elif query.negations != candidate.negations:
            reason = "negation"
        elif query.quotes != candidate.quotes:
            reason = "quote"
        elif query.identifiers != candidate.identifiers:
            reason = "identifier"
        elif not (_named_in(query.entities - candidate.entities, candidate.words)
                  and _named_in(candidate.entities - query.entities, query.words)):
            reason = "entity"
        if reason is not None:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return reason


def _named_in(names: frozenset[str], words: frozenset[str]) -> bool:
    """Whether every name occurs in ``words`` (in any case: "Paris" in "flights to paris")."""
    return all(all(part in words for part in name.split()) for name in names)


def _is_plain_abbreviation(token: str) -> bool:
    """e.g., i.e., U.S. look like dotted identifiers but are prose."""
    parts = token.rstrip(".").split(".")
    return len(parts) > 1 and all(len(p) == 1 for p in parts)  # e.g, i.e, a.m, U.S.A
