"""The request classifier: features, the shipped rules on labelled requests, rule checks."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from proxy.routing import features
from proxy.routing.classifier import (
    TIERS,
    Classifier,
    ClassifierError,
    load_default_rules,
)
from proxy.routing.features import SCAN_CHARS, Features, features_of
from proxy.wire.canonical import Endpoint

CHAT = Endpoint.CHAT
RESPONSES = Endpoint.RESPONSES
COMPLETIONS = Endpoint.COMPLETIONS


def msg(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def user(text: str) -> dict[str, Any]:
    return msg("user", text)


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": list(messages), **extra}


def tool(name: str, description: str = "") -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


SUPPORT_BOT = "You are a helpful assistant for Acme Corp. Answer briefly and politely."

PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the new bike lanes on Main Street. "
    "Residents spoke for almost two hours: shop owners worried about losing parking spaces, "
    "while parents said the lanes would make the walk to school safer for their children. "
    "The council agreed to run a six-month trial starting in the spring and to publish "
    "traffic counts every month so that everyone can see how the street is used.")

ARTICLE = " ".join([PARAGRAPH] * 8)  # ~3,300 chars: more than a "short" request

POLICY = ("Refunds are accepted within 30 days of delivery when the item is unused and in its "
          "original packaging. Store credit is offered after that. Shipping fees are not "
          "refunded unless the item arrived damaged. ") * 20  # ~4,600 chars of system prompt

RETRIEVED = "\n\n".join(
    f"[doc {i}] Section {i} of the employee handbook. " + PARAGRAPH * 2 for i in range(40))

PY_FUNCTION = '''def average(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)
'''

TRACEBACK = '''Traceback (most recent call last):
  File "/app/worker.py", line 42, in <module>
    main()
  File "/app/worker.py", line 37, in main
    rows = load(path)
KeyError: 'customer_id'
'''

JS_SNIPPET = '''const total = items.reduce((sum, item) => sum + item.price, 0);
if (total > limit) {
  throw new Error("over budget");
}
'''

PERSON_SCHEMA = {"type": "json_schema", "json_schema": {
    "name": "person", "strict": True, "schema": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"], "additionalProperties": False}}}

CHITCHAT = [user("Hey, can you help me pick a name for my new puppy?"),
            msg("assistant", "Of course! What breed is it?"),
            user("A golden retriever."),
            msg("assistant", "How about Sunny, Maple or Biscuit?"),
            user("Nice. Something shorter?")]


def turns(n: int) -> list[dict[str, Any]]:
    return [msg("user" if i % 2 == 0 else "assistant", f"Message number {i} about the trip.")
            for i in range(n)]


# (id, endpoint, body, expected tier)
EXAMPLES: list[tuple[str, Endpoint, dict[str, Any], str]] = [
    # --- simple: short, plain requests
    ("greeting", CHAT, chat(user("Hi! How are you today?")), "simple"),
    ("greeting-with-system", CHAT, chat(msg("system", SUPPORT_BOT), user("hello")), "simple"),
    ("capital-lookup", CHAT, chat(user("What is the capital of Australia?")), "simple"),
    ("author-lookup", CHAT, chat(user("Who wrote Pride and Prejudice?")), "simple"),
    ("translate-french", CHAT,
     chat(user("Translate to French: 'Where is the nearest train station?'")), "simple"),
    ("translate-spanish", CHAT, chat(
        msg("system", "You translate customer messages."),
        user("Translate into Spanish: Thank you for your order, it ships tomorrow.")), "simple"),
    ("summarize-paragraph", CHAT,
     chat(user("Summarize in one sentence:\n\n" + PARAGRAPH)), "simple"),
    ("polite-rewrite", CHAT,
     chat(user("Rewrite this to sound more polite: 'Send me the report now.'")), "simple"),
    ("sentiment", CHAT, chat(user(
        "Is this review positive or negative? 'The battery died after two days.'")), "simple"),
    ("spelling", CHAT,
     chat(user("Fix the spelling: 'I recieved the pakage yesterday'")), "simple"),
    ("date-format", CHAT,
     chat(user("Write 2024-03-15 as a date like 'March 15, 2024'.")), "simple"),
    ("json-mode-small", CHAT, chat(
        user("Return the city and country in 'I live in Lyon, France' as JSON."),
        response_format={"type": "json_object"}), "simple"),
    ("short-chitchat", CHAT, chat(*CHITCHAT[:3]), "simple"),
    ("completions-haiku", COMPLETIONS,
     {"model": "gpt-3.5-turbo-instruct", "prompt": "Write a haiku about autumn leaves."},
     "simple"),
    ("responses-synonym", RESPONSES,
     {"model": "gpt-4o", "input": "Give me a synonym for 'happy'."}, "simple"),
    ("responses-instructions", RESPONSES, {
        "model": "gpt-4o", "instructions": "Answer in one word.",
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "What color is the sky on a clear day?"}]}]},
     "simple"),
    ("sampling-params-short", CHAT,
     chat(user("Suggest a title for a blog post about houseplants."), temperature=0.9),
     "simple"),

    # --- standard: tools, medium-sized inputs, longer chats
    ("agent-two-tools", CHAT, chat(
        msg("system", "You are a travel agent. Use tools when needed."),
        user("What's the weather in Lisbon tomorrow?"),
        tools=[tool("get_weather"), tool("search_flights")]), "standard"),
    ("agent-tool-result", CHAT, chat(
        user("What's the weather in Lisbon tomorrow?"),
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "sunny"}'},
        tools=[tool("get_weather")]), "standard"),
    ("legacy-functions", CHAT, chat(
        user("Book a table for two at 7pm."),
        functions=[{"name": "book_table", "parameters": {"type": "object"}}]), "standard"),
    ("responses-hosted-tools", RESPONSES, {
        "model": "gpt-4o", "input": "Find the opening hours of the Louvre.",
        "tools": [{"type": "web_search_preview"},
                  {"type": "function", "name": "save_note", "parameters": {}}]}, "standard"),
    ("summarize-article", CHAT,
     chat(user("Summarize this article in three bullet points:\n\n" + ARTICLE)), "standard"),
    ("chat-eight-turns", CHAT, chat(*turns(8)), "standard"),
    ("chitchat-five-turns", CHAT, chat(*CHITCHAT), "standard"),
    ("support-long-policy", CHAT, chat(
        msg("system", SUPPORT_BOT + "\n\nPolicy:\n" + POLICY),
        user("Can I return shoes I wore once?")), "standard"),
    ("email-draft-long-context", CHAT, chat(user(
        "Draft a friendly follow-up email to the client about the points below.\n\n"
        + PARAGRAPH + "\n\n" + PARAGRAPH)), "standard"),
    ("completions-long", COMPLETIONS,
     {"model": "gpt-3.5-turbo-instruct", "prompt": ARTICLE + "\n\nTL;DR:"}, "standard"),
    ("audio-question", CHAT, chat(msg("user", [
        {"type": "text", "text": "What does the speaker say?"},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}])),
     "standard"),

    # --- complex: reasoning, code, math, schemas, many tools, images, long contexts
    ("extract-json-schema", CHAT, chat(
        user("Extract the person: 'Maria, 34, lives in Porto.'"),
        response_format=PERSON_SCHEMA), "complex"),
    ("responses-json-schema", RESPONSES, {
        "model": "gpt-4o", "input": "Extract the invoice number from: INV-2231 due May 3.",
        "text": {"format": {"type": "json_schema", "name": "invoice", "schema": {}}}},
     "complex"),
    ("code-review-fenced", CHAT, chat(user(
        "Can you review this function?\n```python\n" + PY_FUNCTION + "```")), "complex"),
    ("code-review-unfenced", CHAT,
     chat(user("Any issues with this?\n\n" + PY_FUNCTION)), "complex"),
    ("bug-traceback", CHAT, chat(user(
        "My worker crashes on startup:\n\n" + TRACEBACK + "\nWhat is going on?")), "complex"),
    ("js-snippet", CHAT, chat(user("What does this do?\n" + JS_SNIPPET)), "complex"),
    ("math-word-problem", CHAT, chat(user(
        "A train leaves at 3 pm going 60 km/h and another leaves an hour later at 80 km/h. "
        "Solve for the time when the second train catches up.")), "complex"),
    ("linear-equation", CHAT, chat(user("What is x if 3x + 5 = 20 and 2 + 2 = 4?")),
     "complex"),
    ("latex-integral", CHAT, chat(user("Evaluate $\\int_0^1 x^2 \\, dx$.")), "complex"),
    ("reasoning-effort", CHAT, chat(user("Is 221 a good house number?"),
                                    reasoning_effort="high", model="o3-mini"), "complex"),
    ("responses-reasoning", RESPONSES, {
        "model": "o4-mini", "reasoning": {"effort": "medium"},
        "input": "Name a fruit."}, "complex"),
    ("compare-brokers", CHAT, chat(user(
        "Compare Kafka and RabbitMQ for our event pipeline.")), "complex"),
    ("step-by-step", CHAT, chat(user(
        "Explain why the sky is blue, step by step.")), "complex"),
    ("system-design", CHAT, chat(user(
        "Design a rate limiter for a multi-tenant API.")), "complex"),
    ("debug-docker", CHAT, chat(user(
        "My Docker container keeps restarting. Help me debug it.")), "complex"),
    ("forced-tool", CHAT, chat(
        user("Log this expense: lunch, 14 euros."),
        tools=[tool("log_expense")],
        tool_choice={"type": "function", "function": {"name": "log_expense"}}), "complex"),
    ("tool-choice-required", CHAT, chat(
        user("Look up order 1234."), tools=[tool("get_order")], tool_choice="required"),
     "complex"),
    ("agent-six-tools", CHAT, chat(
        msg("system", "You are an operations agent."),
        user("Restart the billing service in staging."),
        tools=[tool(n) for n in ("list_services", "restart_service", "get_logs",
                                 "scale_service", "get_metrics", "page_oncall")]), "complex"),
    ("image-question", CHAT, chat(msg("user", [
        {"type": "text", "text": "What's in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])),
     "complex"),
    ("responses-image", RESPONSES, {"model": "gpt-4o", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "Describe this chart."},
        {"type": "input_image", "image_url": "https://example.com/chart.png"}]}]}, "complex"),
    ("long-rag-context", CHAT, chat(
        msg("system", "Answer using only the documents below.\n\n" + RETRIEVED),
        user("How many vacation days do new employees get?")), "complex"),
    ("long-chat", CHAT, chat(*turns(16)), "complex"),
]


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(load_default_rules())


def test_examples_are_many_and_cover_every_tier() -> None:
    assert len(EXAMPLES) >= 40
    assert {tier for *_, tier in EXAMPLES} == set(TIERS)
    assert len({name for name, *_ in EXAMPLES}) == len(EXAMPLES)


@pytest.mark.parametrize(("endpoint", "body", "tier"),
                         [pytest.param(e, b, t, id=n) for n, e, b, t in EXAMPLES])
def test_shipped_rules_on_labelled_requests(classifier: Classifier, endpoint: Endpoint,
                                            body: dict[str, Any], tier: str) -> None:
    features = features_of(endpoint, body)
    got, reason = classifier.classify(features)
    assert got == tier, (reason, features)


def test_examples_exercise_every_shipped_rule(classifier: Classifier) -> None:
    reasons = {classifier.classify(features_of(e, b))[1] for _, e, b, _ in EXAMPLES}
    assert reasons == {rule["name"] for rule in load_default_rules()}


def test_shipped_rules_put_complex_before_simple() -> None:
    tiers = [rule["tier"] for rule in load_default_rules()]
    last_complex = max(i for i, t in enumerate(tiers) if t == "complex")
    assert last_complex < tiers.index("simple") < tiers.index("standard")
    assert "when" not in load_default_rules()[-1]  # the catch-all


def test_reason_names_the_matching_rule(classifier: Classifier) -> None:
    assert classifier.classify(features_of(CHAT, chat(user("hi")))) == ("simple", "short-plain")
    body = chat(user("hi"), reasoning_effort="low")
    assert classifier.classify(features_of(CHAT, body)) == ("complex", "reasoning-requested")


def test_load_default_rules_returns_a_copy() -> None:
    rules = load_default_rules()
    rules[0]["tier"] = "simple"
    rules.append({"tier": "complex"})
    assert load_default_rules()[0]["tier"] == "complex"
    assert len(load_default_rules()) == len(rules) - 1


# --- features ---------------------------------------------------------------


def test_chat_sizes_and_turns() -> None:
    body = chat(msg("system", "abcd"), msg("developer", "ef"), user("hello"),
                msg("assistant", "hi there"),
                msg("user", [{"type": "text", "text": "one"}, {"type": "text", "text": "two!"}]))
    f = features_of(CHAT, body)
    assert f.prompt_chars == 4 + 2 + 5 + 8 + 3 + 4
    assert f.system_chars == 6
    assert f.turns == 5
    assert f.user_turns == 2
    assert f.last_user_chars == 7
    assert f.est_input_tokens == f.prompt_chars // 4 + 4 * 5


def test_chat_tool_traffic_counts_as_prompt() -> None:
    body = chat(user("weather?"),
                {"role": "assistant", "content": None, "tool_calls": [
                    {"type": "function", "function": {"name": "w", "arguments": '{"c":"x"}'}}]},
                {"role": "tool", "tool_call_id": "1", "content": "sunny"})
    f = features_of(CHAT, body)
    assert f.prompt_chars == len("weather?") + len('{"c":"x"}') + len("sunny")
    assert f.turns == 3
    assert f.last_user_chars == len("weather?")


def test_responses_shapes() -> None:
    f = features_of(RESPONSES, {"input": "hello there", "instructions": "be brief"})
    assert (f.prompt_chars, f.system_chars, f.turns, f.user_turns, f.last_user_chars) == (
        19, 8, 1, 1, 11)
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "call it"},
                                     {"type": "input_image", "image_url": "data:..."}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "result!"},
        {"role": "developer", "content": "rules"},
    ]
    f = features_of(RESPONSES, {"input": items, "max_output_tokens": 50,
                                "reasoning": {"effort": "low"}})
    assert f.prompt_chars == 7 + 2 + 7 + 5
    assert f.turns == 4
    assert f.user_turns == 1
    assert f.system_chars == 5
    assert f.has_images
    assert f.max_output_tokens == 50
    assert f.reasoning_requested


def test_completions_shapes() -> None:
    f = features_of(COMPLETIONS, {"prompt": "Once upon a time"})
    assert (f.prompt_chars, f.turns, f.user_turns, f.last_user_chars) == (16, 1, 1, 16)
    f = features_of(COMPLETIONS, {"prompt": ["ab", "cde"], "max_tokens": 7})
    assert (f.prompt_chars, f.turns, f.last_user_chars, f.max_output_tokens) == (5, 2, 3, 7)
    f = features_of(COMPLETIONS, {"prompt": [1, 2, 3, 4]})  # token ids
    assert f.prompt_chars == 0
    assert f.est_input_tokens == 4


def test_embeddings_do_not_raise() -> None:
    f = features_of(Endpoint.EMBEDDINGS, {"input": ["a", "bb"]})
    assert f.prompt_chars == 3


def test_tools() -> None:
    assert not features_of(CHAT, chat(user("x"))).has_tools
    f = features_of(CHAT, chat(user("x"), tools=[tool("a"), tool("b")],
                               functions=[{"name": "c"}]))
    assert (f.has_tools, f.tool_count, f.parallel_tool_calls, f.tool_choice_required) == (
        True, 3, True, False)
    f = features_of(CHAT, chat(user("x"), tools=[], functions=[]))
    assert (f.has_tools, f.tool_count, f.parallel_tool_calls) == (False, 0, False)
    f = features_of(CHAT, chat(user("x"), tools=[tool("a")], parallel_tool_calls=False))
    assert not f.parallel_tool_calls
    assert not features_of(CHAT, chat(user("x"), parallel_tool_calls=True)).parallel_tool_calls


@pytest.mark.parametrize(("extra", "required"), [
    ({"tool_choice": "required"}, True),
    ({"tool_choice": {"type": "function", "function": {"name": "a"}}}, True),
    ({"tool_choice": {"type": "function", "name": "a"}}, True),  # Responses
    ({"tool_choice": {"type": "allowed_tools", "mode": "required", "tools": []}}, True),
    ({"function_call": {"name": "a"}}, True),  # legacy functions API
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, False),
    ({"tool_choice": "auto"}, False),
    ({"tool_choice": "none"}, False),
    ({"function_call": "auto"}, False),
    ({}, False),
])
def test_tool_choice_required(extra: dict[str, Any], required: bool) -> None:
    f = features_of(CHAT, chat(user("x"), tools=[tool("a")], **extra))
    assert f.tool_choice_required is required


def test_images_and_audio() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    f = features_of(CHAT, chat(msg("user", [{"type": "text", "text": "what?"}, image])))
    assert (f.has_images, f.has_audio, f.prompt_chars) == (True, False, 5)
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    assert features_of(CHAT, chat(msg("user", [audio]))).has_audio
    assert features_of(CHAT, chat(user("x"), modalities=["text", "audio"])).has_audio
    assert features_of(CHAT, chat(user("x"), audio={"voice": "alloy"})).has_audio
    assert not features_of(CHAT, chat(user("x"), modalities=["text"])).has_audio
    # An image in an earlier turn still has to be read.
    f = features_of(CHAT, chat(msg("user", [image]), msg("assistant", "a cat"), user("sure?")))
    assert f.has_images


def test_response_formats() -> None:
    f = features_of(CHAT, chat(user("x"), response_format=PERSON_SCHEMA))
    assert (f.json_schema, f.json_mode) == (True, False)
    f = features_of(CHAT, chat(user("x"), response_format={"type": "json_object"}))
    assert (f.json_schema, f.json_mode) == (False, True)
    f = features_of(RESPONSES, {"input": "x", "text": {"format": {"type": "json_schema"}}})
    assert (f.json_schema, f.json_mode) == (True, False)
    f = features_of(RESPONSES, {"input": "x", "text": {"format": {"type": "json_object"}}})
    assert (f.json_schema, f.json_mode) == (False, True)
    f = features_of(CHAT, chat(user("x"), response_format={"type": "text"}))
    assert (f.json_schema, f.json_mode) == (False, False)


@pytest.mark.parametrize(("endpoint", "extra", "requested"), [
    (CHAT, {"reasoning_effort": "low"}, True),
    (CHAT, {"reasoning_effort": "none"}, True),  # still a reasoning-model parameter
    (CHAT, {"reasoning_effort": None}, False),
    (RESPONSES, {"reasoning": {"effort": "high"}}, True),
    (RESPONSES, {"reasoning": {"summary": "auto"}}, True),
    (RESPONSES, {"reasoning": {"effort": "none"}}, True),
    (RESPONSES, {"reasoning": None}, False),
    (RESPONSES, {}, False),
])
def test_reasoning_requested(endpoint: Endpoint, extra: dict[str, Any], requested: bool) -> None:
    assert features_of(endpoint, {"input": "x", **extra}).reasoning_requested is requested


@pytest.mark.parametrize(("text", "code"), [
    ("Look:\n```\nx\n```", True),
    (PY_FUNCTION, True),
    (TRACEBACK, True),
    (JS_SNIPPET, True),
    ("#include <stdio.h>\nint main(void) {\n  return 0;\n}", True),
    ("import os\nfrom pathlib import Path", True),
    ("fn main() {\n    println!(\"hi\");\n}", True),
    ("SELECT id FROM users;\nDELETE FROM users WHERE id = 3;", True),
    ("What is a Python decorator?", False),
    ("Import the CSV, then clean it.\nClass starts at nine; bring a pen.", False),
    ("Dear team,\nthe meeting moved to Friday.\nThanks,\nAna", False),
    ("Write a function that adds two numbers.", False),
])
def test_has_code(text: str, code: bool) -> None:
    assert features_of(CHAT, chat(user(text))).has_code is code


@pytest.mark.parametrize(("text", "math"), [
    ("Simplify \\frac{a}{b} + \\frac{c}{d}", True),
    ("Is $x^2 + 1$ ever zero?", True),
    ("Compute 12 * 7 and 3 + 4.", True),
    ("Solve for y.", True),
    ("Find the derivative of sin(x).", True),
    ("Prove that there are infinitely many primes.", True),
    ("What is the probability of two heads?", True),
    ("∫ f(x) dx over the real line", True),
    ("What is 12 * 7?", False),  # one expression: plain arithmetic
    ("Meet on 2024-01-15 or 2024-02-01, 9-5 works, open 24/7.", False),
    ("The shirt costs $5 and the hat $10.", False),
    ("Tell me a joke about cats.", False),
])
def test_math(text: str, math: bool) -> None:
    assert features_of(CHAT, chat(user(text))).math is math


@pytest.mark.parametrize(("text", "cue"), [
    ("Think carefully before answering.", True),
    ("Let's go step-by-step.", True),
    ("Analyse the logs.", True),
    ("What are the trade-offs?", True),
    ("Explain why it fails.", True),
    ("Why does the cache miss?", True),
    ("Find the root cause.", True),
    ("Draw the architecture.", True),
    ("Make a plan for the migration.", True),
    ("(Reasoning) is welcome.", True),
    ("The price is reasonable.", False),
    ("Give me an explanation of the planets.", False),
    ("Thanks, that's all.", False),
])
def test_reasoning_cues(text: str, cue: bool) -> None:
    assert features_of(CHAT, chat(user(text))).reasoning_cues is cue


@pytest.mark.parametrize("word", [*features._MATH_WORDS, *features._CUE_WORDS])
def test_every_listed_word_is_found_whole(word: str) -> None:
    def found(text: str) -> bool:
        f = features_of(CHAT, chat(user(text)))
        return f.math if word in features._MATH_WORDS else f.reasoning_cues

    assert found(word)
    assert found(f"Please, {word.upper()}.")
    assert found(f"line one\n{word}: now")
    assert not found(f"x{word}")
    assert not found(f"{word}xyz")


def test_only_the_last_user_turn_is_scanned() -> None:
    f = features_of(CHAT, chat(user(PY_FUNCTION), msg("assistant", "ok"), user("thanks!")))
    assert not f.has_code
    f = features_of(CHAT, chat(user("thanks!"), msg("assistant", PY_FUNCTION)))
    assert not f.has_code


def test_only_the_tail_of_a_long_turn_is_scanned() -> None:
    padding = "The weather was fine all week. " * (SCAN_CHARS // 20)
    assert len(padding) > SCAN_CHARS
    f = features_of(CHAT, chat(user(PY_FUNCTION + padding)))
    assert not f.has_code
    assert f.last_user_chars == len(PY_FUNCTION + padding)
    assert features_of(CHAT, chat(user(padding + "\n" + PY_FUNCTION))).has_code
    parts = [{"type": "text", "text": padding}, {"type": "text", "text": PY_FUNCTION}]
    f = features_of(CHAT, chat(msg("user", parts)))
    assert f.has_code
    assert f.last_user_chars == len(padding) + len(PY_FUNCTION)


def test_max_output_tokens_and_sampling() -> None:
    assert features_of(CHAT, chat(user("x"))).max_output_tokens is None
    assert features_of(CHAT, chat(user("x"), max_tokens=10)).max_output_tokens == 10
    assert features_of(CHAT, chat(user("x"), max_completion_tokens=20)).max_output_tokens == 20
    assert features_of(RESPONSES, {"input": "x", "max_output_tokens": 30}).max_output_tokens == 30
    assert features_of(CHAT, chat(user("x"), max_tokens=True)).max_output_tokens is None
    assert features_of(CHAT, chat(user("x"), max_tokens="10")).max_output_tokens is None
    assert not features_of(CHAT, chat(user("x"))).sampling_params
    assert not features_of(CHAT, chat(user("x"), temperature=None)).sampling_params
    for key, value in [("temperature", 0), ("top_p", 0.5), ("presence_penalty", 0.1),
                       ("frequency_penalty", 0.2), ("logit_bias", {}), ("logprobs", True)]:
        assert features_of(CHAT, chat(user("x"), **{key: value})).sampling_params, key


MALFORMED: list[tuple[Endpoint, Any]] = [
    (CHAT, {}),
    (CHAT, {"messages": "hello"}),
    (CHAT, {"messages": None}),
    (CHAT, {"messages": [None, 3, "x", ["user", "hi"]]}),
    (CHAT, {"messages": [{"role": "user", "content": None}]}),
    (CHAT, {"messages": [{"role": "user", "content": 42}]}),
    (CHAT, {"messages": [{"role": 7, "content": "hi"}]}),
    (CHAT, {"messages": [{"role": ["user"], "content": [{"type": ["image_url"]}]}]}),
    (CHAT, {"messages": [{"role": {"a": 1}, "content": [{"type": {"t": 1}, "text": None}]}]}),
    (CHAT, {"messages": [{"role": "user", "content": [1, None, ["x"], {"type": 5},
                                                       {"type": "text", "text": 9}]}]}),
    (CHAT, {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "f"}]}]}),
    (CHAT, {"messages": [{"role": "assistant", "tool_calls": {"a": 1}, "function_call": 3}]}),
    (CHAT, {"messages": [], "tools": {"a": 1}, "functions": "f", "tool_choice": 5,
            "response_format": "json", "reasoning_effort": None, "max_tokens": "9",
            "modalities": "audio", "temperature": None}),
    (CHAT, {"messages": [], "tool_choice": {"type": None}, "response_format": {"type": 3}}),
    (RESPONSES, {"input": 12, "instructions": ["x"], "text": "json", "reasoning": "high"}),
    (RESPONSES, {"input": [None, 1, {"type": "function_call_output", "output": 5},
                           {"type": "function_call", "arguments": None},
                           {"role": "user", "content": {"text": "x"}}],
                 "text": {"format": None}}),
    (COMPLETIONS, {"prompt": None, "suffix": 3}),
    (COMPLETIONS, {"prompt": [None, {"a": 1}, [1, 2]]}),
    (COMPLETIONS, {"prompt": {"text": "x"}}),
    (Endpoint.EMBEDDINGS, {"input": 3.5}),
    (CHAT, []),
    (CHAT, None),
    (RESPONSES, "a string body"),
]


@pytest.mark.parametrize(("endpoint", "body"), MALFORMED)
def test_malformed_bodies_never_raise(classifier: Classifier, endpoint: Endpoint,
                                      body: Any) -> None:
    f = features_of(endpoint, body)
    assert isinstance(f, Features)
    assert f.prompt_chars >= 0
    assert not f.has_code
    assert classifier.classify(f)[0] in TIERS


def test_malformed_values_count_as_absent() -> None:
    f = features_of(CHAT, {"messages": [{"role": "user", "content": None}, 3,
                                        {"role": "user", "content": [None, "ab"]}],
                           "tools": "x", "tool_choice": 1, "reasoning_effort": None})
    assert (f.turns, f.user_turns, f.prompt_chars, f.last_user_chars) == (2, 2, 2, 2)
    assert not (f.has_tools or f.tool_choice_required or f.reasoning_requested)


# --- the classifier ------------------------------------------------------------


def feats(**changes: Any) -> Features:
    """A plain, short request's features with ``changes`` applied."""
    return dataclasses.replace(features_of(CHAT, chat(user("hi"))), **changes)


@pytest.mark.parametrize(("header", "expected"), [
    ("complex", ("complex", "header")),
    ("Simple", ("simple", "header")),
    ("  STANDARD \t", ("standard", "header")),
    ("turbo", ("simple", "short-plain")),
    ("", ("simple", "short-plain")),
    ("com plex", ("simple", "short-plain")),
    (None, ("simple", "short-plain")),
])
def test_header_override(classifier: Classifier, header: str | None,
                         expected: tuple[str, str]) -> None:
    assert classifier.classify(feats(), header) == expected


def test_header_overrides_a_complex_rule(classifier: Classifier) -> None:
    complex_request = feats(has_code=True)
    assert classifier.classify(complex_request) == ("complex", "code")
    assert classifier.classify(complex_request, "simple") == ("simple", "header")


def test_first_match_wins() -> None:
    rules: list[dict[str, Any]] = [
        {"tier": "simple", "when": {"turns": {"le": 2}}, "name": "few"},
        {"tier": "complex", "when": {"turns": {"le": 5}}, "name": "some"},
        {"tier": "standard"}]
    c = Classifier(rules)
    assert c.classify(feats(turns=1)) == ("simple", "few")
    assert c.classify(feats(turns=4)) == ("complex", "some")
    assert c.classify(feats(turns=9)) == ("standard", "rule2")
    reordered = Classifier([rules[1], rules[0], rules[2]])
    assert reordered.classify(feats(turns=1)) == ("complex", "some")


def test_default_when_nothing_matches() -> None:
    c = Classifier([{"tier": "complex", "when": {"has_code": True}}])
    assert c.classify(feats()) == ("standard", "default")
    assert Classifier([], default_tier="simple").classify(feats()) == ("simple", "default")
    assert Classifier([{"tier": "complex", "when": {}}]).classify(feats()) == (
        "complex", "rule0")
    assert Classifier([{"tier": "complex", "when": None}]).classify(feats()) == (
        "complex", "rule0")


def test_and_of_conditions_and_ranges() -> None:
    c = Classifier([{"tier": "complex", "name": "mid",
                     "when": {"has_tools": True, "tool_count": {"ge": 2, "lt": 5}}}])
    assert c.classify(feats(has_tools=True, tool_count=2))[1] == "mid"
    assert c.classify(feats(has_tools=True, tool_count=4))[1] == "mid"
    assert c.classify(feats(has_tools=True, tool_count=5))[1] == "default"
    assert c.classify(feats(has_tools=False, tool_count=3))[1] == "default"
    eq = Classifier([{"tier": "simple", "when": {"turns": {"eq": 3}}}])
    assert eq.classify(feats(turns=3))[0] == "simple"
    assert eq.classify(feats(turns=2))[0] == "standard"


def test_false_condition_matches_false_only() -> None:
    c = Classifier([{"tier": "simple", "when": {"has_code": False}}])
    assert c.classify(feats(has_code=False))[0] == "simple"
    assert c.classify(feats(has_code=True))[0] == "standard"


def test_unknown_numeric_feature_never_matches() -> None:
    for op in ("gt", "ge", "lt", "le", "eq"):
        c = Classifier([{"tier": "complex", "when": {"max_output_tokens": {op: 0}}}])
        assert c.classify(feats(max_output_tokens=None))[0] == "standard", op
    c = Classifier([{"tier": "complex", "when": {"max_output_tokens": {"gt": 4000}}}])
    assert c.classify(feats(max_output_tokens=8000))[0] == "complex"
    assert c.classify(feats(max_output_tokens=100))[0] == "standard"


def test_any_is_an_or_of_ands() -> None:
    c = Classifier([{"tier": "complex", "name": "hard", "when": {
        "turns": {"ge": 2},
        "any": [{"has_code": True},
                {"math": True, "est_input_tokens": {"gt": 100}},
                {"any": [{"has_images": True}]}]}}])
    assert c.classify(feats(turns=2, has_code=True))[1] == "hard"
    assert c.classify(feats(turns=2, math=True, est_input_tokens=200))[1] == "hard"
    assert c.classify(feats(turns=2, math=True, est_input_tokens=50))[1] == "default"
    assert c.classify(feats(turns=2, has_images=True))[1] == "hard"
    assert c.classify(feats(turns=1, has_code=True))[1] == "default"  # the AND outside any
    assert c.classify(feats(turns=2))[1] == "default"


@pytest.mark.parametrize(("rules", "message"), [
    ([{"tier": "complex", "when": {"promt_chars": {"gt": 1}}}],
     "rules[0].when.promt_chars: unknown feature (did you mean 'prompt_chars'?)"),
    ([{"tier": "simple"}, {"tier": "simple"},
      {"tier": "complex", "when": {"prompt_chars": {"gtt": 1}}}],
     "rules[2].when.prompt_chars: unknown operator 'gtt'"),
    ([{"tier": "hard"}], "rules[0].tier: unknown tier 'hard'"),
    ([{"tier": "Complex"}], "rules[0].tier: unknown tier 'Complex'"),
    ([{"when": {"has_code": True}}], "rules[0].tier: missing"),
    ([{"tier": "complex", "when": {"has_code": "yes"}}],
     "rules[0].when.has_code: has_code is a boolean feature, expected true or false"),
    ([{"tier": "complex", "when": {"has_code": 1}}],
     "rules[0].when.has_code: has_code is a boolean feature"),
    ([{"tier": "complex", "when": {"turns": 12}}],
     "rules[0].when.turns: turns is a numeric feature, expected a mapping"),
    ([{"tier": "complex", "when": {"turns": True}}],
     "rules[0].when.turns: turns is a numeric feature"),
    ([{"tier": "complex", "when": {"turns": {}}}],
     "rules[0].when.turns: turns is a numeric feature"),
    ([{"tier": "complex", "when": {"turns": {"gt": "ten"}}}],
     "rules[0].when.turns.gt: expected a number, got str 'ten'"),
    ([{"tier": "complex", "when": {"turns": {"gt": False}}}],
     "rules[0].when.turns.gt: expected a number, got bool"),
    ([{"tier": "complex"}, ["tier", "simple"]], "rules[1]: expected a mapping, got list"),
    ([{"tier": "complex", "when": ["has_code"]}], "rules[0].when: expected a mapping"),
    ([{"tier": "complex", "if": {}}], "rules[0].if: unknown key"),
    ([{"tier": "complex", "name": 3}], "rules[0].name: expected a non-empty string"),
    ([{"tier": "complex", "when": {"any": []}}],
     "rules[0].when.any: expected a non-empty list"),
    ([{"tier": "complex", "when": {"any": {"has_code": True}}}],
     "rules[0].when.any: expected a non-empty list"),
    ([{"tier": "complex", "when": {"any": [{"has_code": True}, {"turns": {"over": 1}}]}}],
     "rules[0].when.any[1].turns: unknown operator 'over'"),
    ([{"tier": "complex", "when": {"any": [{"any": [{"colour": True}]}]}}],
     "rules[0].when.any[0].any[0].colour: unknown feature"),
    ([{"tier": "complex", "when": {"any": ["has_code"]}}],
     "rules[0].when.any[0]: expected a mapping"),
    ({"tier": "complex"}, "rules: expected a list of rules, got dict"),
    ("complex", "rules: expected a list of rules, got str"),
])
def test_rule_validation_names_the_path(rules: Any, message: str) -> None:
    with pytest.raises(ClassifierError, match="^" + re.escape(message)):
        Classifier(rules)


def test_bad_default_tier() -> None:
    with pytest.raises(ClassifierError, match=r"^default_tier: unknown tier 'medium'"):
        Classifier([], default_tier="medium")


def test_classifier_error_is_a_value_error() -> None:
    assert issubclass(ClassifierError, ValueError)
