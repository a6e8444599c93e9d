"""Prompt text normalization for the cache's normalized (L2) tier.

The normalized key is the exact key computed after this module rewrote the
prompt text, so two requests share an entry when their texts become equal
here. A wrong merge serves one prompt another prompt's answer, a missed one
only costs an upstream call, so every step below must be unable to make two
prompts equal that could get different answers; where that is not certain
the text is left alone.

The steps of ``Normalizer.normalize_text``, in order:

1. ``nfkc``: Unicode NFKC compatibility forms. Full-width letters and digits
   (what CJK input methods type), ligatures, non-breaking and ideographic
   spaces, half-width katakana, circled digits and similar are presentation
   variants of the same characters. Exception: superscripts, subscripts and
   vulgar fractions are kept as written, since NFKC reads ``2³`` as ``23``,
   ``log₂8`` as ``log28`` and ``1½`` as eleven halves. NFKC applies to code too
   (Python itself NFKC-normalizes identifiers), and it runs first so that a
   full-width digit or backtick is seen by the later steps as what it is.
2. Volatile values (``VolatilePatterns``): a timestamp, date, time, UUID,
   request id or trace id becomes a placeholder such as ``⟨uuid⟩``. Agents
   put the current time and a request id into every system prompt, and
   without this no two of their requests would ever share an entry. This is
   the one step that is safe only by assumption: the value must not decide
   the answer. Two defences where it might: by default values are replaced
   only in system and developer messages (``VOLATILE_ROLES``: where agents
   stamp the time and ids; in a user turn the date or id is usually the
   question), and ``echoes_other_values`` lets the cache refuse a hit whose
   answer quotes a value the new prompt does not contain (a tool call that
   carries the old id). ``volatile=None`` turns the step off. Numbers in general are never
   touched: every default pattern needs the shape of a date, a clock time or
   an id (a UUID; a ``req_``/``run_``/``trace_``/``span_``/``msg_`` prefix
   followed by at least 12 letters and digits with at least one digit; 32
   lowercase hex digits with at least one letter), so ``2+2`` and ``2+3`` or
   ``version 3.11`` and ``3.12`` stay apart.
3. In prose only (see below), ``fold_case``: ``str.casefold``. A model
   answers "What is X" and "what is x" the same way; identifiers, where case
   matters, belong in code.
4. In prose only, ``collapse_whitespace``: any whitespace run becomes one
   space and the text is stripped; line breaks in prose carry no meaning a
   model would answer differently. The newline that precedes an indented
   line is folded too, but the indented line itself is code and keeps its
   indentation, so the two stay distinguishable.
5. In prose only, ``strip_trailing_punctuation``: ``. ! ? ; : ,`` and
   whitespace at the very end of the text ("Hello?!" and "Hello" ask the
   same). It never empties a text ("?" stays "?"), never touches code, and
   keeps a ``!`` right after a digit, a closing bracket or a single letter:
   that is factorial notation ("What is 5!" is not "What is 5").

Quoted text in prose ("...", “...”, «...», and '...' outside a word) is kept as
written, like code: a quote is often the exact string a regex, a comparison
or a translation must work on, so ``match "Hello"`` and ``match "hello"`` stay
apart.

Code is text between backticks (a run of N backticks up to the next run of
exactly N, within one paragraph), a fenced block (``` or ~~~ at the start of
a line, up to a closing fence of the same character and at least the same
length) and every non-first line that starts with a space or a tab (Markdown
indented code, and pasted code or YAML without fences, where indentation is
meaning). Code keeps its case, spacing and punctuation. An unterminated
backtick run or fence makes the rest of the text code: a stray backtick
costs hits, never a wrong merge.

Deliberately not normalized: numbers (no rounding, no digit grouping, no
unit conversion), words of any kind (negations, stopwords, plurals, synonyms),
punctuation anywhere but the very end, quote styles (NFKC keeps curly
quotes), code. In ``normalize_messages`` only the text of
system, developer, user and assistant messages is rewritten; tool and
function results are data and stay byte-exact, as do names, roles, tool
calls, images, audio and files. Tool definitions and every other request
field never reach this module.

A legacy completions prompt is text the model continues, not a question it
answers, so ``normalize_continued`` applies the steps above within lines
only: line breaks, leading whitespace and the text's ending (trailing
punctuation included) are kept as written.

Every regular expression is compiled at import or in a constructor.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

__all__ = [
    "DEFAULT_PATTERNS",
    "DEFAULT_VOLATILE",
    "Normalizer",
    "Segment",
    "VolatilePatterns",
    "collapse_whitespace",
    "fold_case",
    "nfkc",
    "split_code_segments",
    "strip_trailing_punctuation",
]

# Bump when a change here can map some text to a different normalized form:
# it is part of ``Normalizer.signature``, so old entries stop matching.
NORMALIZATION_VERSION: Final = 2

# --- NFKC ------------------------------------------------------------------

_KEPT_TAGS: Final = ("<super>", "<sub>", "<fraction>")
# The blocks holding every character whose compatibility decomposition is
# tagged <super>, <sub> or <fraction> (through Unicode 15.1). Scanning these
# takes well under a millisecond at import; scanning planes 0 and 1 whole
# takes ~30 ms. tests/test_cache_normalize.py checks the list is complete for
# the running Python's Unicode database.
_KEPT_BLOCKS: Final = (
    (0x00A0, 0x00FF), (0x02B0, 0x02FF), (0x10A0, 0x10FF), (0x1D00, 0x1DBF),
    (0x2070, 0x218F), (0x2C60, 0x2C7F), (0x2D30, 0x2D7F), (0x3190, 0x319F),
    (0xA640, 0xA69F), (0xA700, 0xA7FF), (0xAB30, 0xAB6F), (0x10780, 0x107BF),
    (0x1E030, 0x1E08F), (0x1F100, 0x1F1FF),
)


def _kept_chars() -> str:
    return "".join(c for lo, hi in _KEPT_BLOCKS for c in map(chr, range(lo, hi + 1))
                   if unicodedata.decomposition(c).startswith(_KEPT_TAGS))


_KEPT_RUN: Final = re.compile(f"[{re.escape(_kept_chars())}]+")


def nfkc(text: str) -> str:
    """Unicode NFKC, except that superscripts, subscripts and fractions stay.

    ``"\\uff21\\uff22\\uff23 \\ufb01\\u00a0x"`` (full-width ABC, a
    ligature, a non-breaking space) becomes ``"ABC fi x"`` but ``"2³"`` stays ``"2³"``.
    Pure ASCII text is returned as is (it is always NFKC already).
    """
    if text.isascii():
        return text
    if _KEPT_RUN.search(text) is None:
        return unicodedata.normalize("NFKC", text)
    parts: list[str] = []
    pos = 0
    for m in _KEPT_RUN.finditer(text):
        parts.append(unicodedata.normalize("NFKC", text[pos:m.start()]))
        parts.append(m.group())
        pos = m.end()
    parts.append(unicodedata.normalize("NFKC", text[pos:]))
    return "".join(parts)


# --- Case, whitespace, punctuation -------------------------------------------

_WS_RUN: Final = re.compile(r"\s+")
# Within lines only (legacy prompts keep their line breaks): a run of spaces
# and tabs, and one that ends a line.
_LINE_WS_RUN: Final = re.compile(r"[^\S\r\n]+")
_SPACE_AT_EOL: Final = re.compile(r"[^\S\r\n]+(?=\r?\n)")
# A quoted string in prose: "...", “...”, «...» or '...' not inside a word (so
# "what's" is not a quote).
_QUOTED: Final = re.compile(  # a quote character first: the scan skips prose fast
    "[\"\u201c\u00ab'](?:(?<=\")[^\"\n]*\"|(?<=\u201c)[^\u201d\n]*\u201d"
    "|(?<=\u00ab)[^\u00bb\n]*\u00bb|(?<=')(?<![\\w']')[^'\n]+'(?![\\w']))")
_TRAILING: Final = ".!?;:, \t\r\n\f\v"


def fold_case(text: str) -> str:
    """``str.casefold``: ``"Straße HELLO"`` becomes ``"strasse hello"``."""
    return text.casefold()


def collapse_whitespace(text: str) -> str:
    """Every whitespace run (newlines, tabs, NBSP...) becomes one space; both ends stripped."""
    return _WS_RUN.sub(" ", text).strip()


def _keeps_bang(before: str) -> bool:
    """Whether a ``!`` after ``before`` is factorial notation (``5!``, ``(n+1)!``, ``n!``)."""
    last = before[-1]
    if last.isdigit() or last in ")]":
        return True
    return last.isalpha() and (len(before) == 1 or not before[-2].isalnum())


def _strip_tail(text: str) -> str:
    """``text`` without its trailing punctuation and whitespace, factorials kept."""
    stripped = text.rstrip(_TRAILING)
    tail = text[len(stripped):]
    if tail.startswith("!") and stripped and _keeps_bang(stripped):
        return stripped + tail[:len(tail) - len(tail.lstrip("!"))]
    return stripped


def strip_trailing_punctuation(text: str) -> str:
    """Drop ``. ! ? ; : ,`` and whitespace at the very end: ``"Hello?!"`` becomes ``"Hello"``.

    Nothing is removed when the text ends in code (``split_code_segments``),
    when nothing would be left (``"?"`` stays ``"?"``), or from a ``!`` that
    is factorial notation (``"What is 5!"`` stays).
    """
    if not text or text[-1] not in _TRAILING:
        return text
    last = split_code_segments(text)[-1]
    if last.code:
        return text
    head = text[:len(text) - len(last.text)]
    tail = _strip_tail(last.text)
    return head + tail if head or tail else text


# --- Code segments -----------------------------------------------------------


class Segment(NamedTuple):
    """A piece of a text: prose, or code to be kept as written."""

    text: str
    code: bool


# A fence opener, from the start of its line: up to 3 spaces, then 3+ backticks
# (whose info string holds no backtick) or 3+ tildes.
_FENCE: Final = r"[ ]{0,3}(?:(?P<bt>`{3,})[^`\n]*|(?P<tl>~{3,})[^\n]*)$"
_FENCE_AT_START: Final = re.compile(_FENCE, re.M)
# Where code can start: a backtick run, or after a newline a fence opener or
# a block of lines that each start with a space or tab.
_CODE_START: Final = re.compile(
    r"(?P<ticks>`+)"
    rf"|\n(?:(?P<fence>{_FENCE})|(?P<indent>[ \t]+\S[^\n]*(?:\n[ \t]+\S[^\n]*)*))",
    re.M)
_CLOSING_FENCE: Final = re.compile(r"\n[ ]{0,3}(`{3,}|~{3,})[ \t]*\r?$", re.M)
_TICK_RUN: Final = re.compile(r"`+")
# What ends a paragraph, and with it any backtick span: a blank line or a fence.
_PARAGRAPH_END: Final = re.compile(r"\n(?:[ \t]*\r?\n|[ ]{0,3}(?:`{3,}[^`\n]*|~{3,}[^\n]*)$)",
                                   re.M)


def _fence_end(text: str, pos: int, fence: str) -> int:
    """End of the fenced block whose opener line ends at ``pos`` (the text's end if open)."""
    for m in _CLOSING_FENCE.finditer(text, pos):
        run = m.group(1)
        if run[0] == fence[0] and len(run) >= len(fence):
            return m.end()
    return len(text)


def _span_end(text: str, pos: int, ticks: int) -> int:
    """End of the code span opened by ``ticks`` backticks ending at ``pos`` (or the text's end)."""
    for m in _TICK_RUN.finditer(text, pos):
        if m.end() - m.start() == ticks:
            # endpos at the closer: the work stays linear in the span's length.
            if _PARAGRAPH_END.search(text, pos, m.end()) is None:
                return m.end()
            break
    return len(text)


def split_code_segments(text: str) -> list[Segment]:
    """Split ``text`` into alternating prose and code segments that join back to ``text``.

    Code segments include their delimiters: backtick spans, fenced blocks
    (opening line to closing line) and runs of indented lines. An
    unterminated span or fence is code up to the end of the text.
    """
    segments: list[Segment] = []
    pos = prose = 0
    first = _FENCE_AT_START.match(text)
    if first is not None:
        pos = prose = _fence_end(text, first.end(), first.group("bt") or first.group("tl"))
        segments.append(Segment(text[:pos], True))
    while pos < len(text):
        m = _CODE_START.search(text, pos)
        if m is None:
            break
        ticks = m.group("ticks")
        if ticks is not None:
            start, end = m.start(), _span_end(text, m.end(), len(ticks))
        elif m.group("fence") is not None:
            start = m.start() + 1
            end = _fence_end(text, m.end(), m.group("bt") or m.group("tl"))
        else:
            start, end = m.start() + 1, m.end()
        if start > prose:
            segments.append(Segment(text[prose:start], False))
        segments.append(Segment(text[start:end], True))
        pos = prose = end
    if prose < len(text):
        segments.append(Segment(text[prose:], False))
    return segments


# --- Volatile values ---------------------------------------------------------

_OFFSET = r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3])(?::?[0-5][0-9])?)"
_HMS = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
_SECONDS = r"(?:[0-5][0-9]|60)"
_HEX = "[0-9A-Fa-f]"


def _first_digit(not_after: str) -> str:
    """A digit not preceded by a character of ``not_after``.

    The lookbehind follows the digit rather than preceding it so that the
    regex engine skips ahead to the next digit instead of trying every
    position: half the cost on prose.
    """
    return rf"[0-9](?<![{not_after}][0-9])"


# year-month-day, the year not glued to a word or a hyphen (2026-11-25-3 is arithmetic)
_YMD = _first_digit(r"\w-") + r"[0-9]{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"

DEFAULT_VOLATILE: Final[tuple[tuple[str, str], ...]] = (
    ("uuid", rf"\b{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}\b"),
    # W3C trace id: lowercase hex with a letter, so a 32-digit number stays.
    ("trace_id", r"\b(?=[0-9]*[a-f])[0-9a-f]{32}\b"),
    # With a digit, so identifiers like run_preprocessingstep stay.
    ("request_id", r"\b(?:req|run|trace|span|msg)_(?=[A-Za-z]*[0-9])[A-Za-z0-9]{12,}\b"),
    # 2026-11-25T01:53:21Z, 2026-11-25 01:53:21.123+00:00, 2026-11-25 01:53:21,123 (logging)
    ("timestamp", rf"{_YMD}[Tt ]{_HMS}(?::{_SECONDS}(?:[.,][0-9]{{1,9}})?)?{_OFFSET}?"
                  r"(?![\w:-]|[.,][0-9])"),
    ("date", rf"{_YMD}(?![\w-]|[.:][0-9])"),
    # 01:53:21(.123)(Z): seconds required, as 10:30 is as likely a ratio or a verse.
    ("time", _first_digit(r"\w:.+-") + rf"[0-9](?<=[01][0-9]|2[0-3]):[0-5][0-9]:{_SECONDS}"
             rf"(?:\.[0-9]{{1,9}})?{_OFFSET}?(?![\w:]|\.[0-9])"),
)
"""Built-in volatile values as (name, regex), applied in this order."""

_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


class VolatilePatterns:
    """Regexes whose matches become ``⟨name⟩`` placeholders, compiled once.

    ``VolatilePatterns(extra)`` holds ``DEFAULT_VOLATILE`` (unless
    ``defaults=False``) followed by ``extra``; patterns apply in that order,
    each to the previous one's output. A bad pattern raises ``ValueError``
    naming it.
    """

    __slots__ = ("_compiled", "_patterns", "_signature")

    def __init__(self, extra: Sequence[tuple[str, str]] = (), *, defaults: bool = True) -> None:
        pairs: list[tuple[str, str]] = list(DEFAULT_VOLATILE) if defaults else []
        for item in extra:
            try:
                name, pattern = item
            except (TypeError, ValueError):
                raise ValueError(f"volatile pattern {item!r}: expected a (name, regex) pair"
                                 ) from None
            pairs.append((name, pattern))
        compiled: list[tuple[re.Pattern[str], str]] = []
        seen: set[str] = set()
        for name, pattern in pairs:
            if not isinstance(name, str) or _NAME.fullmatch(name) is None:
                raise ValueError(f"volatile pattern name {name!r}: use letters, digits, '_', "
                                 "'.' and '-', starting with a letter")
            if name in seen:
                raise ValueError(f"volatile pattern {name!r}: defined twice")
            seen.add(name)
            if not isinstance(pattern, str):
                raise ValueError(f"volatile pattern {name!r}: the regex must be a string, "
                                 f"got {pattern!r}")
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"volatile pattern {name!r}: invalid regex {pattern!r}: {exc}"
                                 ) from None
            if regex.fullmatch("") is not None:
                raise ValueError(f"volatile pattern {name!r}: regex {pattern!r} matches the "
                                 "empty string")
            compiled.append((regex, f"⟨{name}⟩"))
        self._compiled = tuple(compiled)
        self._patterns = tuple(pairs)
        self._signature = hashlib.blake2b(
            "\x00".join(f"{n}\x00{p}" for n, p in pairs).encode(), digest_size=8).hexdigest()

    @property
    def patterns(self) -> tuple[tuple[str, str], ...]:
        """The (name, regex) pairs, in the order they apply."""
        return self._patterns

    @property
    def signature(self) -> str:
        """A short hash of the patterns: equal for equal pattern lists."""
        return self._signature

    def replace(self, text: str) -> str:
        """``text`` with each match replaced by its pattern's ``⟨name⟩`` placeholder."""
        for regex, placeholder in self._compiled:
            text = regex.sub(placeholder, text)
        return text

    def values(self, text: str) -> set[str]:
        """Every volatile value in ``text``."""
        return {m.group(0) for regex, _ in self._compiled for m in regex.finditer(text)}


DEFAULT_PATTERNS: Final = VolatilePatterns()
"""``DEFAULT_VOLATILE``, compiled: the ``Normalizer``'s default."""


# --- The normalizer ----------------------------------------------------------

# Messages whose text is prose to rewrite; other roles (tool, function,
# ipython...) carry data and stay exact.
_PROSE_ROLES: Final = frozenset({"system", "developer", "user", "assistant"})
# Where volatile values are replaced by default: the instructions agents stamp
# with the time or a request id. In a user turn a date or an id is usually
# what the question is about ("what weekday is 2026-11-25?").
VOLATILE_ROLES: Final = frozenset({"system", "developer"})


class Normalizer:
    """Rewrites prompt text into its normalized form (see the module docstring)."""

    __slots__ = ("_case", "_punctuation", "_volatile", "_volatile_roles", "_whitespace")

    def __init__(self, *, case: bool = True, whitespace: bool = True, punctuation: bool = True,
                 volatile: VolatilePatterns | None = DEFAULT_PATTERNS,
                 volatile_roles: frozenset[str] = VOLATILE_ROLES) -> None:
        self._case = case
        self._whitespace = whitespace
        self._punctuation = punctuation
        self._volatile = volatile
        self._volatile_roles = volatile_roles

    def echoes_other_values(self, answer: str, request: str) -> bool:
        """Whether ``answer`` quotes a volatile value (id, timestamp) absent from ``request``.

        An entry found through the normalized tier was stored for a prompt
        whose volatile values may differ from this one's; an answer repeating
        them ("order 5f0c... cancelled") would be wrong here, so the hit is refused.
        """
        if self._volatile is None:
            return False
        return any(value not in request for value in self._volatile.values(answer))

    @property
    def signature(self) -> str:
        """Identifies what this normalizer does; differs whenever outputs could.

        For a key that must not match entries normalized another way (another
        replica's configuration, an older version of this module).
        """
        volatile = self._volatile.signature if self._volatile is not None else "-"
        roles = ",".join(sorted(self._volatile_roles))
        return (f"n{NORMALIZATION_VERSION}:c{self._case:d}w{self._whitespace:d}"
                f"p{self._punctuation:d}:{volatile}@{roles}")

    def normalize_text(self, text: str, volatile_values: bool = True) -> str:
        """NFKC, volatile values (if ``volatile_values``), then in prose: case fold,
        whitespace, trailing punctuation."""
        text = nfkc(text)
        volatile = self._volatile if volatile_values else None
        if not (self._case or self._whitespace or self._punctuation):
            return text if volatile is None else volatile.replace(text)
        segments = split_code_segments(text)
        if not segments:
            return text
        parts: list[str] = []
        for segment in segments:
            part = segment.text if volatile is None else volatile.replace(segment.text)
            if not segment.code:
                part = self._prose(part)
            parts.append(part)
        if self._whitespace:
            if not segments[0].code:
                parts[0] = parts[0].lstrip()
            if not segments[-1].code:
                parts[-1] = parts[-1].rstrip()
        if self._punctuation and not segments[-1].code:
            tail = _strip_tail(parts[-1])
            if tail or any(parts[:-1]):  # never empty the whole text
                parts[-1] = tail
        return "".join(parts)

    def _prose(self, text: str, fold: Callable[[str], str] | None = None) -> str:
        """Case fold and collapse whitespace, outside quoted strings (kept as written)."""
        fold = fold or self._fold
        out: list[str] = []
        pos = 0
        for m in _QUOTED.finditer(text):
            out.append(fold(text[pos:m.start()]))
            out.append(m.group())
            pos = m.end()
        out.append(fold(text[pos:]))
        return "".join(out)

    def _fold(self, prose: str) -> str:
        if self._case:
            prose = prose.casefold()
        if self._whitespace:
            prose = _WS_RUN.sub(" ", prose)
        return prose

    def _fold_in_lines(self, prose: str) -> str:
        # No case fold: a model continues a text in its own case and style, and
        # a raw prompt is often unfenced code whose identifiers' case matters.
        if self._whitespace:
            prose = _LINE_WS_RUN.sub(" ", _SPACE_AT_EOL.sub("", prose))
        return prose

    def mask_volatile(self, text: str, role: str = "user") -> str:
        """``text`` with only its volatile values replaced (when ``role``'s are).

        For the semantic tier, which compares what a prompt asks: a timestamp
        an agent stamps into it is not part of that, while case and
        punctuation are kept for the guard to read names and identifiers.
        """
        if self._volatile is None or role not in self._volatile_roles:
            return text
        return self._volatile.replace(text)

    def normalize_prompt(self, prompt: Any) -> str | list[str] | None:
        """A legacy completions ``prompt`` (a string or a list of strings), normalized
        with ``normalize_continued``; None for token ids, which only the exact tier serves."""
        if isinstance(prompt, str):
            return self.normalize_continued(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.normalize_continued(p) for p in prompt]
        return None

    def normalize_continued(self, text: str) -> str:
        """Text a model continues (a legacy prompt): ``normalize_text`` within lines.

        A model continues such a text as written, so what shapes the
        continuation stays: the line breaks (a few-shot layout, code), the
        leading whitespace, and the whole ending from the last character that
        is neither whitespace nor ``. ! ? ; : ,`` (``"A:"`` and ``"A"``, or a
        prompt ending in ``"\\n"`` or a space, continue differently). Between
        them: NFKC, volatile values when ``user`` is among the volatile roles
        (a prompt is the user's text), and in prose the collapse of space and tab
        runs (spaces that end a line are dropped). Case is kept: the model
        continues the text's own case, and unfenced code is common here.
        Code segments are kept as in ``normalize_text``.
        """
        text = nfkc(text)
        end = len(text.rstrip(_TRAILING))
        start = len(text) - len(text.lstrip())
        if start >= end:
            return text
        volatile = self._volatile if "user" in self._volatile_roles else None
        parts = [text[:start]]
        for segment in split_code_segments(text[start:end]):
            part = segment.text if volatile is None else volatile.replace(segment.text)
            if not segment.code and (self._case or self._whitespace):
                part = self._prose(part, self._fold_in_lines)
            parts.append(part)
        parts.append(text[end:])
        return "".join(parts)

    def normalize_messages(self, messages: Any) -> Any:
        """A new message list with the prose text of each message normalized.

        String ``content`` and the ``text`` of ``{"type": "text"}`` parts are
        rewritten in system, developer, user and assistant messages; all else
        is kept. The input is never modified; the lists and dicts on the way
        to a rewritten string are new, other values are shared with it.
        Anything not shaped like a message list is returned unchanged.
        """
        if not isinstance(messages, list):
            return messages
        return [self._message(message) for message in messages]

    def normalize_input(self, value: Any) -> Any:
        """A ``prompt``/``input`` value: a string or a list of strings is normalized.

        Anything else (token ids, message items) is returned unchanged.
        """
        if isinstance(value, str):
            return self.normalize_text(value)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return [self.normalize_text(item) for item in value]
        return value

    def _message(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return message
        role = message.get("role")
        if not isinstance(role, str) or role not in _PROSE_ROLES or "content" not in message:
            return dict(message)
        content = message["content"]
        volatile = role in self._volatile_roles
        if isinstance(content, str):
            content = self.normalize_text(content, volatile)
        elif isinstance(content, list):
            content = [self._part(part, volatile) for part in content]
        return {**message, "content": content}

    def _part(self, part: Any, volatile: bool) -> Any:
        if (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            return {**part, "text": self.normalize_text(part["text"], volatile)}
        return part
