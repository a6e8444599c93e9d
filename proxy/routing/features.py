"""Request features for the tier classifier: cheap, explainable facts about one request.

:func:`features_of` reads an intercepted body once. Sizes come from ``len`` of
the strings as they are (no copies); only the tail of the last user turn is
scanned by the precompiled regexes below, so the cost is bounded whatever the
prompt size. A malformed body never raises: a field of the wrong type counts
as absent, which leaves it for the upstream to reject.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, fields
from typing import Any

from proxy.wire.canonical import Endpoint

# Cues near the end of a long prompt are the ones that describe the task; the
# cap keeps the regex cost constant for 100 KB RAG prompts.
SCAN_CHARS = 8_000
_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4

_SYSTEM_ROLES = frozenset({"system", "developer"})
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_AUDIO_PARTS = frozenset({"input_audio", "audio"})
_SAMPLING_KEYS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty",
                            "logit_bias", "logprobs", "top_logprobs"})
_MAX_OUTPUT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")

# Code hints. Each match is one line boundary: the line before ends in { } or ;
# or the line after starts like code. The literal "\n" in front lets the regex
# engine jump from newline to newline instead of trying every position. Stack
# traces count: a pasted traceback is a debugging task without the word "debug".
_CODE_HINT = re.compile(
    r"\n(?:(?<=[{};]\n)|(?<=[{};]\r\n)"
    # Python has no braces: indented returns and block headers ending in ":".
    r"|[ \t]+(?:return\b|(?:if|elif|for|while|with|try|except|else)\b[^\n]*:[ \t]*(?=\r?\n))"
    r"|[ \t]*(?:"
    r"(?:async[ \t]+)?def[ \t]+\w+[ \t]*\("
    r"|class[ \t]+\w+[ \t]*[:(<{]"
    r"|(?:export[ \t]+)?(?:async[ \t]+)?function\b[ \t]*\*?[ \t]*\w*[ \t]*\("
    r"|import[ \t]+[\w.{*]"
    r"|from[ \t]+[\w.]+[ \t]+import[ \t]"
    r"|#include[ \t]*[<\"]"
    r"|(?:const|let|var)[ \t]+\w+[ \t]*[=:]"
    r"|(?:pub[ \t]+)?fn[ \t]+\w+[ \t]*[(<]"
    r"|func[ \t]+\w"
    r"|(?:public|private|protected)[ \t]+\w"
    r"|Traceback \(most recent call last\)"
    r"|File \"[^\"\n]+\", line \d"
    r"|at [\w$.<>]+\("
    r"))")
_CODE_HINTS_MIN = 2
_FENCE = "```"
_ARROW = "=>"

_LATEX = re.compile(
    r"\\(?:frac|dfrac|sqrt|int|iint|oint|sum|prod|lim|partial|nabla|cdot|times|infty"
    r"|alpha|beta|gamma|theta|lambda|sigma|mathbb|mathrm|binom|begin\{(?:equation|align))"
    r"(?![a-z])")
_DOLLAR_MATH = re.compile(r"\$\$[^$]+\$\$|\$[^$\n]*[\\^_=][^$\n]*\$")
_MATH_SYMBOLS = "∫∑∏√∂∞≤≥≠"
# An operator with a digit after it (found by the regex, whose literal first
# character makes the search fast) and one before it (checked in Python, on
# the few candidates). Spaced "-" and "/" only: "2024-01-15" and "24/7" are
# not arithmetic. Includes the multiplication and division signs.
_OPERATOR_THEN_DIGIT = tuple(
    (operator, re.compile(re.escape(operator) + r"[ \t]*[0-9]"))
    for operator in ("+", "*", "^", "=", "\u00d7", "\u00f7", " - ", " / "))
_ARITHMETIC_MIN = 2
_DIGITS = "0123456789"

_MATH_WORDS = (
    "solve", "solved", "solving", "integral", "integrals", "integrate", "derivative",
    "derivatives", "differentiate", "proof", "proofs", "prove", "theorem", "lemma",
    "equation", "equations", "inequality", "probability", "eigenvalue", "eigenvalues",
    "eigenvector", "eigenvectors", "polynomial", "polynomials", "factorial", "modulo",
    "calculate", "how many ways")
_CUE_WORDS = (
    "step by step", "step-by-step", "think carefully", "think hard", "think deeply",
    "think through", "reason", "reasoning", "analyze", "analyse", "analyzing", "analysing",
    "prove", "trade-off", "trade-offs", "tradeoff", "tradeoffs", "compare", "comparing",
    "comparison", "design a", "design an", "plan", "planning", "debug", "debugging",
    "why does", "explain why", "root cause", "architecture", "pros and cons", "in depth",
    "in-depth", "rigorous", "rigorously")
# Word starts: after a space (the scanned text starts with one, and these are
# turned into spaces first), as a literal prefix keeps the search fast.
_WORD_SEPARATORS = ("\n", "\t", "(", '"', "*", "`")


def _alternation(words: typing.Iterable[str]) -> str:
    """A regex matching any of ``words``, factored as a trie.

    The regex engine tries alternatives one by one; a trie makes that a few
    first-letter tests per position instead of one per word.
    """
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        ends = "" in node
        branches = [re.escape(char) + emit(child)
                    for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = "(?:" + "|".join(branches) + ")"
        return body + "?" if ends else body

    return emit(trie)


_WORD = re.compile(" " + _alternation({*_MATH_WORDS, *_CUE_WORDS}) + "(?![a-z])")
_MATH_SET = frozenset(_MATH_WORDS)
_CUE_SET = frozenset(_CUE_WORDS)


@dataclass(frozen=True, slots=True)
class Features:
    """What the classifier knows about one request.

    Sizes count characters of every turn; the text features (``has_code``,
    ``math``, ``reasoning_cues``) read only the last ``SCAN_CHARS`` characters
    of the last user turn, where the task is usually stated.
    """

    prompt_chars: int
    """All text the model reads: system, messages or input items (with tool call
    arguments and results), instructions."""
    est_input_tokens: int
    """``prompt_chars // 4`` plus 4 per message: a cheap estimate, not a tokenizer count."""
    last_user_chars: int
    turns: int
    """Messages (chat), input items (responses) or prompts (completions)."""
    user_turns: int
    system_chars: int
    """System and developer messages, and Responses ``instructions``."""
    has_tools: bool
    """A non-empty ``tools`` or legacy ``functions`` list."""
    tool_count: int
    tool_choice_required: bool
    """``tool_choice`` is "required" or names a specific tool (or legacy ``function_call``)."""
    parallel_tool_calls: bool
    """Tools are offered and ``parallel_tool_calls`` is not false."""
    has_images: bool
    has_audio: bool
    """Audio input parts, or audio output asked for (``audio``, ``modalities``)."""
    json_schema: bool
    json_mode: bool
    reasoning_requested: bool
    """``reasoning_effort`` (any value) or a Responses ``reasoning`` object."""
    has_code: bool
    """A code fence, or two code hints: lines starting like code (def, class, import,
    #include, stack-trace lines...), lines ending in { } or ;, ``=>`` arrows."""
    math: bool
    """LaTeX, ``$...$`` formulas, math symbols, two arithmetic expressions, or words
    such as solve, integral, derivative, prove, theorem."""
    reasoning_cues: bool
    """Phrases such as "step by step", "analyze", "compare", "trade-offs", "debug",
    "root cause", "design a", "plan"."""
    max_output_tokens: int | None
    """``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``; None if unset."""
    sampling_params: bool
    """Temperature, top_p, penalties, logit_bias, logprobs or top_logprobs are set: reasoning
    models reject them."""


def _kinds() -> dict[str, str]:
    hints = typing.get_type_hints(Features)
    return {f.name: "bool" if hints[f.name] is bool else "number" for f in fields(Features)}


FEATURE_KINDS: dict[str, str] = _kinds()
"""Each feature's kind: ``"bool"`` or ``"number"`` (an int, or None when unknown)."""


class _Scan:
    """Running totals of one pass over the conversation."""

    __slots__ = ("audio", "chars", "extra_tokens", "images", "last_user", "last_user_chars",
                 "system_chars", "turns", "user_turns")

    def __init__(self) -> None:
        self.chars = 0
        self.extra_tokens = 0
        self.system_chars = 0
        self.turns = 0
        self.user_turns = 0
        self.images = False
        self.audio = False
        # The last user turn's content, unread: only it is joined and scanned.
        self.last_user: Any = None
        self.last_user_chars = 0

    def content(self, content: Any) -> int:
        """Count a message's content (a string or a list of parts); return its text size."""
        if isinstance(content, str):
            self.chars += len(content)
            return len(content)
        if not isinstance(content, list):
            return 0
        size = 0
        for part in content:
            if isinstance(part, str):
                size += len(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    size += len(text)
                else:
                    kind = part.get("type")
                    if not isinstance(kind, str):
                        continue
                    if kind in _IMAGE_PARTS:
                        self.images = True
                    elif kind in _AUDIO_PARTS:
                        self.audio = True
        self.chars += size
        return size

    def message(self, item: dict[str, Any]) -> None:
        """Count one chat message or Responses input item."""
        self.turns += 1
        role = item.get("role")
        size = self.content(item.get("content"))
        if role == "user":
            self.user_turns += 1
            self.last_user = item.get("content")
            self.last_user_chars = size
        elif isinstance(role, str) and role in _SYSTEM_ROLES:
            self.system_chars += size
        # Tool traffic is text the model reads too: call arguments and results.
        tool_calls = item.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                if isinstance(call, dict):
                    fn = call.get("function")
                    if isinstance(fn, dict):
                        self.text(fn.get("arguments"))
        function_call = item.get("function_call")
        if isinstance(function_call, dict):
            self.text(function_call.get("arguments"))
        if "role" not in item:
            self.text(item.get("arguments"))  # Responses function_call item
            output = item.get("output")  # Responses function_call_output item
            if isinstance(output, str):
                self.chars += len(output)
            else:
                self.content(output)

    def text(self, value: Any) -> None:
        if isinstance(value, str):
            self.chars += len(value)


def _tail_text(content: Any) -> str:
    """The last ``SCAN_CHARS`` of a content value's text (a string or a list of parts)."""
    if isinstance(content, str):
        return content[-SCAN_CHARS:]
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    size = 0
    # Backwards, so a long list of parts is not joined only to be cut.
    for part in reversed(content):
        text = part if isinstance(part, str) else (
            part.get("text") if isinstance(part, dict) else None)
        if isinstance(text, str):
            texts.append(text)
            size += len(text) + 1
            if size >= SCAN_CHARS:
                break
    texts.reverse()
    return "\n".join(texts)[-SCAN_CHARS:]


def _looks_like_code(text: str) -> bool:
    # Single-character tests first: memchr-fast, and most texts have neither.
    if "`" in text and _FENCE in text:
        return True
    hints = text.count(_ARROW) if ">" in text else 0
    if hints >= _CODE_HINTS_MIN:
        return True
    for _ in _CODE_HINT.finditer("\n" + text + "\n"):
        hints += 1
        if hints >= _CODE_HINTS_MIN:
            return True
    return False


def _digit_before(text: str, index: int) -> bool:
    """Whether a digit sits at ``index`` or before it past spaces and tabs."""
    while index >= 0:
        char = text[index]
        if char in _DIGITS:
            return True
        if char not in " \t":
            return False
        index -= 1
    return False


def _arithmetic(text: str) -> bool:
    """Two or more ``<digit> <operator> <digit>`` expressions."""
    count = 0
    for operator, right in _OPERATOR_THEN_DIGIT:
        # A single-character `in` is a memchr: most texts have few operators.
        if operator not in text:
            continue
        for match in right.finditer(text):
            if _digit_before(text, match.start() - 1):
                count += 1
                if count >= _ARITHMETIC_MIN:
                    return True
    return False


def _looks_like_math(text: str, lowered: str) -> bool:
    # LaTeX is matched lowercased so that \Sigma counts like \sigma.
    if "\\" in text and _LATEX.search(lowered) is not None:
        return True
    if "$" in text and _DOLLAR_MATH.search(text) is not None:
        return True
    if not text.isascii() and any(symbol in text for symbol in _MATH_SYMBOLS):
        return True
    return _arithmetic(text)


def _words(lowered: str) -> tuple[bool, bool]:
    """Whether ``lowered`` has a math word, and whether it has a reasoning cue."""
    math = cue = False
    for match in _WORD.finditer(lowered):
        word = match.group()[1:]
        math = math or word in _MATH_SET
        cue = cue or word in _CUE_SET
        if math and cue:
            break
    return math, cue


def _tool_choice_required(body: dict[str, Any]) -> bool:
    choice = body.get("tool_choice")
    if choice == "required":
        return True
    if isinstance(choice, dict):
        # {"type": "allowed_tools", "mode": "auto"} restricts tools without forcing one.
        if choice.get("type") == "allowed_tools":
            return choice.get("mode") == "required"
        return True
    # The legacy functions API: function_call={"name": ...} forces that function.
    return isinstance(body.get("function_call"), dict)


def _response_format_type(body: dict[str, Any], endpoint: Endpoint) -> Any:
    if endpoint is Endpoint.RESPONSES:
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    else:
        fmt = body.get("response_format")
    return fmt.get("type") if isinstance(fmt, dict) else None


def _reasoning_requested(body: dict[str, Any]) -> bool:
    # Even an effort of "none" counts: only reasoning models accept the parameter.
    return body.get("reasoning_effort") is not None or isinstance(body.get("reasoning"), dict)


def _has_audio(body: dict[str, Any]) -> bool:
    if body.get("audio") is not None:
        return True
    modalities = body.get("modalities")
    return isinstance(modalities, list) and "audio" in modalities


def _sampling_params(body: dict[str, Any]) -> bool:
    if _SAMPLING_KEYS.isdisjoint(body):
        return False
    return any(body.get(key) is not None for key in _SAMPLING_KEYS)


def _max_output_tokens(body: dict[str, Any]) -> int | None:
    for key in _MAX_OUTPUT_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _scan_prompts(scan: _Scan, prompt: Any) -> None:
    """Completions ``prompt`` / embeddings ``input``: a string, strings, or token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif not isinstance(prompt, list):
        return
    for item in prompt:
        if isinstance(item, str):
            scan.turns += 1
            scan.user_turns += 1
            scan.chars += len(item)
            scan.last_user = item
            scan.last_user_chars = len(item)
        elif isinstance(item, int):
            scan.extra_tokens += 1  # a flat list of token ids
        elif isinstance(item, list):
            scan.turns += 1
            scan.user_turns += 1
            scan.extra_tokens += len(item)


def features_of(endpoint: Endpoint, body: dict[str, Any]) -> Features:
    """The features of an intercepted request body; never raises on a malformed body."""
    if not isinstance(body, dict):
        body = {}
    scan = _Scan()
    if endpoint is Endpoint.CHAT:
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, dict):
                    scan.message(message)
    elif endpoint is Endpoint.RESPONSES:
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            scan.chars += len(instructions)
            scan.system_chars += len(instructions)
        items = body.get("input")
        if isinstance(items, str):
            _scan_prompts(scan, items)
        elif isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    scan.message(item)
    elif endpoint is Endpoint.COMPLETIONS:
        _scan_prompts(scan, body.get("prompt"))
        scan.text(body.get("suffix"))
    else:
        _scan_prompts(scan, body.get("input"))

    last = _tail_text(scan.last_user)
    lowered = " " + last.lower()
    for separator in _WORD_SEPARATORS:
        if separator in lowered:
            lowered = lowered.replace(separator, " ")
    math_words, reasoning_cues = _words(lowered)
    tools = body.get("tools")
    functions = body.get("functions")
    tool_count = (len(tools) if isinstance(tools, list) else 0) + (
        len(functions) if isinstance(functions, list) else 0)
    has_tools = tool_count > 0
    format_type = _response_format_type(body, endpoint)

    return Features(
        prompt_chars=scan.chars,
        est_input_tokens=(scan.chars // _CHARS_PER_TOKEN + _TOKENS_PER_MESSAGE * scan.turns
                          + scan.extra_tokens),
        last_user_chars=scan.last_user_chars,
        turns=scan.turns,
        user_turns=scan.user_turns,
        system_chars=scan.system_chars,
        has_tools=has_tools,
        tool_count=tool_count,
        tool_choice_required=_tool_choice_required(body),
        parallel_tool_calls=has_tools and body.get("parallel_tool_calls") is not False,
        has_images=scan.images,
        has_audio=scan.audio or _has_audio(body),
        json_schema=format_type == "json_schema",
        json_mode=format_type == "json_object",
        reasoning_requested=_reasoning_requested(body),
        has_code=_looks_like_code(last),
        math=math_words or _looks_like_math(last, lowered),
        reasoning_cues=reasoning_cues,
        max_output_tokens=_max_output_tokens(body),
        sampling_params=_sampling_params(body),
    )
