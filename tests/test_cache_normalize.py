"""The normalized cache tier's text normalization: each step, and what must never merge."""

from __future__ import annotations

import copy
import unicodedata
from typing import Any

import pytest

from proxy.cache.normalize import (
    DEFAULT_PATTERNS,
    DEFAULT_VOLATILE,
    Normalizer,
    Segment,
    VolatilePatterns,
    collapse_whitespace,
    fold_case,
    nfkc,
    split_code_segments,
    strip_trailing_punctuation,
)

NORM = Normalizer()
UUID_A = "123e4567-e89b-12d3-a456-426614174000"
UUID_B = "9F1C2D3E-4B5A-6C7D-8E9F-0A1B2C3D4E5F"


def _code(text: str) -> list[str]:
    return [s.text for s in split_code_segments(text) if s.code]


# --- nfkc --------------------------------------------------------------------


def test_nfkc_folds_fullwidth_ligatures_and_nbsp() -> None:
    assert nfkc("\uff21\uff22\uff23\uff11\uff12") == "ABC12"  # full-width
    assert nfkc("\ufb01nd") == "find"  # ligature
    assert nfkc("a\u00a0b\u3000c") == "a b c"  # non-breaking and ideographic spaces
    assert nfkc("\uff76\uff80\uff76\uff85") == "カタカナ"  # half-width katakana


def test_nfkc_keeps_superscripts_subscripts_and_fractions() -> None:
    assert nfkc("2³") == "2³"  # plain NFKC: "23"
    assert nfkc("log₂8") == "log₂8"  # plain NFKC: "log28"
    assert nfkc("1½ cups") == "1½ cups"
    # ...while the rest of the same text is still folded
    assert nfkc("\uff38² + \uff39²") == "X² + Y²"


def test_nfkc_ascii_is_returned_as_is() -> None:
    text = "plain ascii, nothing to do"
    assert nfkc(text) is text


def test_kept_characters_cover_every_super_sub_and_fraction() -> None:
    # The module scans a list of blocks; a newer Unicode database must not
    # put such a character outside them unnoticed.
    tags = ("<super>", "<sub>", "<fraction>")
    expected = {c for c in map(chr, range(0x20000))
                if unicodedata.decomposition(c).startswith(tags)}
    assert expected
    assert {c for c in expected if nfkc(c) != c} == set()


# --- case, whitespace, punctuation ---------------------------------------------


def test_fold_case() -> None:
    assert fold_case("What IS the Capital") == "what is the capital"
    assert fold_case("Straße") == "strasse"


def test_collapse_whitespace() -> None:
    assert collapse_whitespace("  a \t b\n\n c  ") == "a b c"
    assert collapse_whitespace("a\u00a0\u00a0b") == "a b"
    assert collapse_whitespace(" \n\t ") == ""


@pytest.mark.parametrize(("text", "expected"), [
    ("Hello?!", "Hello"),
    ("Wait...", "Wait"),
    ("Tell me:  ", "Tell me"),
    ("a, b; c,;: ", "a, b; c"),
    ("Mr. Smith is here", "Mr. Smith is here"),  # only the very end
    ("?", "?"),  # never empty
    ("?!  ", "?!  "),
    ("Run `ls -la`.", "Run `ls -la`"),
    ("Run `ls -la?", "Run `ls -la?"),  # unterminated span: code to the end
    ("```\nx = 1;", "```\nx = 1;"),  # unterminated fence
    ("What is 5!", "What is 5!"),  # factorial
    ("What is 5!!?", "What is 5!!"),
    ("What is (n+1)!", "What is (n+1)!"),
    ("Compute n!", "Compute n!"),
    ("Great job!", "Great job"),
])
def test_strip_trailing_punctuation(text: str, expected: str) -> None:
    assert strip_trailing_punctuation(text) == expected


# --- code segments -----------------------------------------------------------


def test_split_joins_back_to_the_text() -> None:
    text = "a `b` c\n```py\nX = 1\n```\nd\n    e\n  f\ng ``h`i`` j `k"
    segments = split_code_segments(text)
    assert "".join(s.text for s in segments) == text
    assert [s.text for s in segments if s.code] == [
        "`b`", "```py\nX = 1\n```", "    e\n  f", "``h`i``", "`k"]
    assert split_code_segments("") == []
    assert split_code_segments("prose only") == [Segment("prose only", False)]


def test_fences_close_on_same_char_and_at_least_the_same_length() -> None:
    assert _code("````\na\n```\nb\n````\nafter") == ["````\na\n```\nb\n````"]
    assert _code("~~~\na\n```\nb\n~~~\nafter") == ["~~~\na\n```\nb\n~~~"]
    # a closing fence must be alone on its line
    assert _code('```py\ns = "```"\n  x\n```\nafter') == ['```py\ns = "```"\n  x\n```']


def test_unterminated_fence_is_code_to_the_end() -> None:
    text = "Fix this:\n```python\nIF x:\n    Y = 1\n\nWhy?"
    assert _code(text) == ["```python\nIF x:\n    Y = 1\n\nWhy?"]
    assert NORM.normalize_text(text) == "fix this: ```python\nIF x:\n    Y = 1\n\nWhy?"


def test_unterminated_backtick_is_code_to_the_end() -> None:
    assert _code("It`s BIG `Foo` Bar") == ["`s BIG `", "` Bar"]
    # a span ends with its paragraph: a stray backtick before a blank line
    # makes the rest code rather than pairing with a later one
    assert _code("a `b\n\nSee `Foo` here") == ["`b\n\nSee `Foo` here"]
    assert _code("a `b\n```\nc` d\n```") == ["`b\n```\nc` d\n```"]


def test_backtick_fence_with_backtick_in_info_is_an_inline_span() -> None:
    assert _code("```x``` Then MORE") == ["```x```"]


def test_indented_lines_are_code_but_not_the_first_line() -> None:
    assert _code("  Hi\nthere\n\tX = 1\n  Y = 2\nend") == ["\tX = 1\n  Y = 2"]


# --- volatile values ---------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("at 2026-11-25T01:53:21Z.", "at ⟨timestamp⟩."),
    ("at 2026-11-25 01:53:21.123+00:00 ok", "at ⟨timestamp⟩ ok"),
    ("2026-11-25 01:53:21,123 INFO start", "⟨timestamp⟩ INFO start"),
    ("on 2026-11-25.", "on ⟨date⟩."),
    ("at 01:53:21 sharp", "at ⟨time⟩ sharp"),
    (f"id {UUID_A} and {UUID_B}", "id ⟨uuid⟩ and ⟨uuid⟩"),
    ("request req_8f3a9c0d1e2b4a5f failed", "request ⟨request_id⟩ failed"),
    ("run_abc123def456 msg_01XFDUDYJgAACzvnptvVoYEL", "⟨request_id⟩ ⟨request_id⟩"),
    ("traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
     "traceparent 00-⟨trace_id⟩-00f067aa0ba902b7-01"),
])
def test_default_patterns_replace_volatile_values(text: str, expected: str) -> None:
    assert DEFAULT_PATTERNS.replace(text) == expected


@pytest.mark.parametrize("text", [
    "2+2", "version 3.11", "pi is 3.14159", "10:20", "24:00:00", "1:53:21",
    "a ratio of 1:2:3", "2026-13-45", "2026-11-25-3", "x2026-11-25", "call 555-1234",
    "12345678901234567890123456789012",  # a number, not a trace id
    "run_preprocessingstep", "req_short1", "my_req_8f3a9c0d1e2b4a5f", "chatcmpl-8f3a9c0d1e2b4a5f",
])
def test_default_patterns_leave_other_numbers_and_words(text: str) -> None:
    assert DEFAULT_PATTERNS.replace(text) == text


def test_extra_patterns_apply_after_the_defaults() -> None:
    patterns = VolatilePatterns([("ticket", r"\bTCK-[0-9]+\b")])
    assert patterns.replace("TCK-42 at 01:53:21") == "⟨ticket⟩ at ⟨time⟩"
    assert [name for name, _ in patterns.patterns][-1] == "ticket"
    assert len(patterns.patterns) == len(DEFAULT_VOLATILE) + 1
    only = VolatilePatterns([("ticket", r"TCK-[0-9]+")], defaults=False)
    assert only.replace("TCK-42 at 01:53:21") == "⟨ticket⟩ at 01:53:21"


def test_bad_extra_pattern_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"volatile pattern 'ticket'.*invalid regex '\(TCK'"):
        VolatilePatterns([("ticket", "(TCK")])
    with pytest.raises(ValueError, match="'⟨x⟩'"):
        VolatilePatterns([("⟨x⟩", "x")])
    with pytest.raises(ValueError, match="'uuid': defined twice"):
        VolatilePatterns([("uuid", "x")])
    with pytest.raises(ValueError, match="'any': regex 'a\\*' matches the empty string"):
        VolatilePatterns([("any", "a*")])
    with pytest.raises(ValueError, match="pair"):
        VolatilePatterns(["ticket"])  # type: ignore[list-item]


# --- the normalizer: what merges and what must not ----------------------------


@pytest.mark.parametrize(("a", "b"), [
    ("What is the capital of France?", "what is the capital of  France"),
    ("\uff21\uff22\uff23", "abc"),
    ("  Summarize\tthis:\n\nHello World.  ", "summarize this: hello world"),
    ("Now: 2026-11-25T01:53:21Z. Hi", "Now: 2027-01-02T23:00:00.5+02:00. hi"),
    (f"Look up {UUID_A}", f"look up {UUID_B}"),
    ("request req_8f3a9c0d1e2b4a5f: status?", "request req_0000aaaa1111bbbb: status"),
    ("Explain `getUser`!", "explain `getUser`"),
    ("What's the regex for \"Hello\"?", "what's the REGEX for \"Hello\""),
    ("Translate 'Good  Morning' please", "translate 'Good  Morning'   PLEASE"),
])
def test_pairs_that_normalize_equal(a: str, b: str) -> None:
    assert NORM.normalize_text(a) == NORM.normalize_text(b)


@pytest.mark.parametrize(("a", "b"), [
    ("What is 2+2?", "What is 2+3?"),
    ("The service is healthy", "The service is not healthy"),
    ("Call `getUser`", "Call `getuser`"),
    ("Use `a  b`", "Use `a b`"),
    ("```python\nif x:\n    y()\nz()\n```", "```python\nif x:\n    y()\n    z()\n```"),
    ("Fix:\ndef f():\n    return 1", "Fix:\ndef f():\nreturn 1"),  # unfenced code
    ("Fix:\n  a: 1\n  b: 2", "Fix:\n  a: 1  b: 2"),
    ("version 3.11", "version 3.12"),
    ("What is 2³?", "What is 23?"),
    ("What is 5!", "What is 5"),
    ("Run `ls`.", "Run `ls.`"),
    ('Does the regex match "Hello"?', 'Does the regex match "hello"?'),
    ("Sort “Banana” and “apple” by ASCII", "Sort “banana” and “apple” by ASCII"),
    ("Is 'Title Case' a title?", "Is 'Title case' a title?"),
    ("Split 'a  b' on spaces", "Split 'a b' on spaces"),
    ("Is «Paris» right?", "Is «paris» right?"),
])
def test_pairs_that_stay_different(a: str, b: str) -> None:
    assert NORM.normalize_text(a) != NORM.normalize_text(b)


def test_normalize_text_order_and_code() -> None:
    text = ("  \uff33\uff25\uff25 `MyClass.Run()`  at 2026-11-25T01:53:21Z\n"
            "```\nKeep  THIS?\n```\nThanks!! ")
    assert NORM.normalize_text(text) == (
        "see `MyClass.Run()` at ⟨timestamp⟩ ```\nKeep  THIS?\n``` thanks")


def test_normalize_text_never_empties_a_text() -> None:
    assert NORM.normalize_text("?!") == "?!"
    assert NORM.normalize_text(" ? ") == "?"
    assert NORM.normalize_text("`x` ?") == "`x`"
    assert NORM.normalize_text("") == ""


def test_options_turn_steps_off() -> None:
    text = f"Hello   World? {UUID_A}"
    assert Normalizer(case=False).normalize_text(text) == "Hello World? ⟨uuid⟩"
    assert Normalizer(whitespace=False, punctuation=False).normalize_text(text) == (
        "hello   world? ⟨uuid⟩")
    assert Normalizer(volatile=None).normalize_text(text) == f"hello world? {UUID_A}"
    off = Normalizer(case=False, whitespace=False, punctuation=False, volatile=None)
    assert off.normalize_text("\uff21  b?") == "A  b?"


def test_signature_changes_with_what_the_normalizer_does() -> None:
    signatures = {
        NORM.signature, Normalizer(case=False).signature, Normalizer(volatile=None).signature,
        Normalizer(volatile=VolatilePatterns([("t", "TCK")])).signature,
    }
    assert len(signatures) == 4
    assert Normalizer().signature == NORM.signature


# --- messages and inputs -----------------------------------------------------


def _messages() -> list[Any]:
    return [
        {"role": "system", "content": "You are HELPFUL.  Time: 2026-11-25T01:53:21Z"},
        {"role": "user", "name": "Alice", "content": [
            {"type": "text", "text": "What is IN this image?"},
            {"type": "image_url", "image_url": {"url": "https://x.test/A.PNG", "detail": "High"}},
            {"type": "input_audio", "input_audio": {"data": "QUJD", "format": "wav"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_ABC", "type": "function",
             "function": {"name": "getUser", "arguments": '{"Name": "Bob  "}'}}]},
        {"role": "tool", "tool_call_id": "call_ABC", "content": "User:  BOB, created 2026-11-25."},
        {"role": "tool", "tool_call_id": "call_ABC",
         "content": [{"type": "text", "text": "RAW  Data?"}]},
        {"role": "function", "name": "f", "content": "Exact  DATA."},
        {"role": "assistant", "content": "Bob EXISTS."},
    ]


def test_normalize_messages_rewrites_only_prose_text() -> None:
    messages = _messages()
    out = NORM.normalize_messages(messages)
    assert out[0] == {"role": "system", "content": "you are helpful. time: ⟨timestamp⟩"}
    assert out[1]["content"][0] == {"type": "text", "text": "what is in this image"}
    assert out[1]["content"][1:] == messages[1]["content"][1:]  # image and audio untouched
    assert out[1]["name"] == "Alice" and out[1]["role"] == "user"
    assert out[2] == messages[2]  # tool calls untouched
    assert out[3:6] == messages[3:6]  # tool and function results are data
    assert out[6] == {"role": "assistant", "content": "bob exists"}


def test_normalize_messages_does_not_mutate_its_input() -> None:
    messages = _messages()
    before = copy.deepcopy(messages)
    out = NORM.normalize_messages(messages)
    assert messages == before
    assert out is not messages
    assert all(o is not m for o, m in zip(out, messages, strict=True))
    out[0]["content"] = "changed"
    out[1]["content"].append("changed")
    assert messages == before


@pytest.mark.parametrize("odd", [
    None, "a string", 42, {"role": "user", "content": "Hi?"}, [None, 3, "x", ["y"]],
    [{"role": ["user"], "content": "Hi?"}], [{"role": "user"}], [{"content": "Hi?"}],
    [{"role": "user", "content": 7}], [{"role": "user", "content": [7, None, {"type": "text"}]}],
    [{"role": "user", "content": [{"type": "text", "text": ["Hi?"]}, {"type": ["text"]}]}],
])
def test_normalize_messages_leaves_odd_shapes_unchanged(odd: Any) -> None:
    before = copy.deepcopy(odd)
    assert NORM.normalize_messages(odd) == before
    assert odd == before


def test_normalize_input() -> None:
    assert NORM.normalize_input("What  is X?") == "what is x"
    values = ["What  is X?", "A `B`."]
    assert NORM.normalize_input(values) == ["what is x", "a `B`"]
    assert values == ["What  is X?", "A `B`."]
    for other in ([1, 2, 3], [[1, 2]], ["a", 1], None, {"text": "A"}, 5):
        assert NORM.normalize_input(other) == other
