"""Cost-aware routing: what a decision costs, and what three policies save on an agent fleet.

Run: ``.venv/bin/python -m loadtest.bench_routing`` (writes ``loadtest/REPORT-routing.md``;
``--quick`` for a smoke run: 600 requests, 3,000 timed decisions per cell, 200 requests per
sidecar; ``--requests N``, ``--seed S``, ``--out PATH``, ``--json PATH`` for the raw numbers).
Needs no network and no Redis.

Three parts, one run, one seeded workload (``Workload`` below: six agent types, ~3,000 chat
requests for gpt-4o, gpt-4.1, gpt-5 and gpt-4o-mini):

1. **Decision cost in-process.** ``Router.decide`` (features_of + classify + needs + policy)
   per request, on requests already parsed by ``parse_request``, timed call by call with
   ``time.perf_counter_ns`` after a warm-up. Cells: ``parse_request`` alone (a reference: the
   pipeline parses every intercepted body anyway), a Router without policies (the baseline:
   it returns ``no_policy`` at once), the shipped ``CONSERVATIVE`` preset and the wider
   example policy ``WIDE``. Cells are interleaved in rounds so that machine noise hits all.
2. **Overhead through real sidecars.** Three in-process sidecars (``build_app`` +
   ``proxy.server.running``; no policy, ``routing.preset: conservative``, ``WIDE``; response
   cache off so that every request reaches the route stage) in front of the in-process mock
   upstream, each request of the workload sent to the three in turn (rotating order), one at
   a time. Reported: the ``x-sidecar-overhead-ms`` header (time in the sidecar, upstream
   excluded) and the client-side latency.
3. **Money and quality risk.** Every request decided by each policy at budget level ok, soft
   (one tier down) and hard (``on_hard: cheapest``), priced from the shipped catalog: input
   tokens counted with the offline WordPiece tokenizer the repository ships for the semantic
   cache (``proxy/cache/data/minilm-static/tokenizer.json``; not the providers' tokenizer),
   output tokens drawn per request kind from a fixed range (``KINDS``).

Quality is not measured: the mock upstream does not answer for real. Instead every request
kind carries the benchmark author's judgment of the model it needs (``NEEDS``), and the report
counts what each policy moved per judgment, with concrete examples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from tokenizers import Tokenizer

from loadtest.mock_upstream import MockConfig, MockUpstream
from proxy.app import build_app
from proxy.config import (
    CacheConfig,
    LoggingConfig,
    RetryConfig,
    RoutePolicyConfig,
    RoutingConfig,
    SidecarConfig,
    UpstreamConfig,
)
from proxy.context import Identity
from proxy.routing import features as feat
from proxy.routing.catalog import Catalog, build_catalog
from proxy.routing.classifier import TIERS, Classifier, load_default_rules
from proxy.routing.features import features_of
from proxy.routing.policy import CONSERVATIVE, RouteDecision, Router
from proxy.server import loop_factory, running
from proxy.wire.canonical import CanonicalRequest, Endpoint, parse_request

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKENIZER = ROOT / "proxy" / "cache" / "data" / "minilm-static" / "tokenizer.json"
DATE = "2026-11-25"
SEED = 20261125
REQUESTS, QUICK_REQUESTS = 3000, 600
TIMED, QUICK_TIMED = 30_000, 3_000   # decisions per cell
ROUNDS = 6                           # each cell is timed in ROUNDS interleaved blocks
WARMUP = 2_000
SIDECAR_REQUESTS, QUICK_SIDECAR = 3000, 200
SIDECAR_WARMUP = 100
TARGET_P99_US = 50.0
SPLIT_CHARS = 2_000                  # timing split: short vs long last user turn
DEFAULT_OUTPUT_TOKENS = 512          # RoutingConfig.default_output_tokens
IMAGE_TOKENS = 765                   # one 1024x1024 high-detail image on gpt-4o (85 + 4 x 170)
TOKENS_PER_MESSAGE = 4
US = "\u00b5s"
API_KEY = "sk-bench-routing"
NAMESPACE = "agents"

# The wider example policy: simple and standard requests go to a small model, within the
# provider, across the gpt-4o / gpt-4.1 families; complex requests are never touched.
WIDE = (
    RoutePolicyConfig(name="wide:gpt-4o", substitute=("gpt-4o", "gpt-4o-20*"),
                      tiers={"simple": ("gpt-4.1-nano", "gpt-4o-mini"),
                             "standard": ("gpt-4o-mini", "gpt-4.1-mini")}),
    RoutePolicyConfig(name="wide:gpt-4.1", substitute=("gpt-4.1", "gpt-4.1-20*"),
                      tiers={"simple": ("gpt-4.1-nano",), "standard": ("gpt-4.1-mini",)}),
    RoutePolicyConfig(name="wide:gpt-5", substitute=("gpt-5", "gpt-5-20*"),
                      tiers={"simple": ("gpt-5-nano",), "standard": ("gpt-5-mini",)}),
)
POLICIES: dict[str, tuple[RoutePolicyConfig, ...]] = {
    "none": (), "conservative": CONSERVATIVE, "wide": WIDE}
LEVELS = ("ok", "soft", "hard")

NEEDS = {
    "small": "a small model does it as well: labels from a given list, fields stated in the "
             "text, greetings, plain look-ups, plain translations",
    "either": "a small model usually does fine, quality may dip on some: summaries, "
              "chit-chat over several turns, one call among few tools, screenshots",
    "large": "the author would keep the requested model: a small model's answer is likely "
             "worse in a way that matters (policy-bound customer replies, judgment calls, "
             "hard code, legal or medical translation, multi-hop questions, comparisons)",
}


# ---------------------------------------------------------------- the workload


@dataclass(frozen=True, slots=True)
class Kind:
    """A kind of request an agent sends: its share of the agent's traffic and answer length."""

    agent: str
    name: str
    share: float
    out: tuple[int, int]  # output tokens, uniform in [lo, hi]
    about: str


@dataclass(frozen=True, slots=True)
class AgentType:
    """An agent type: its share of the fleet and the models it asks for."""

    name: str
    share: float
    models: dict[str, float]
    about: str


AGENTS = (
    AgentType("support-triage", 0.25,
              {"gpt-4o": 0.45, "gpt-4.1": 0.20, "gpt-5": 0.10, "gpt-4o-mini": 0.25},
              "customer-support helper: ticket labels, field extraction (JSON mode or "
              "schema), moods, FAQ answers, reply drafts; a 1,100-char policy prompt"),
    AgentType("coding", 0.20,
              {"gpt-4o": 0.20, "gpt-4.1": 0.40, "gpt-5": 0.30, "gpt-4o-mini": 0.10},
              "coding agent: tracebacks + code, agent-loop steps with 6 tools and file "
              "contents, commit messages; an IDE chat panel without tools"),
    AgentType("research-rag", 0.15,
              {"gpt-4o": 0.30, "gpt-4.1": 0.45, "gpt-5": 0.15, "gpt-4o-mini": 0.10},
              "RAG/research agent: retrieved documents of 300 to 40,000 tokens, then "
              "summaries, look-ups, comparisons, multi-hop questions"),
    AgentType("chat-ops", 0.20,
              {"gpt-4o": 0.50, "gpt-4.1": 0.20, "gpt-5": 0.10, "gpt-4o-mini": 0.20},
              "ops chat assistant: greetings, short look-ups (some with 2 tools), "
              "translations, multi-turn chats, operational judgment calls"),
    AgentType("tool-workflow", 0.15,
              {"gpt-4o": 0.40, "gpt-4.1": 0.35, "gpt-5": 0.10, "gpt-4o-mini": 0.15},
              "workflow agent: 2-5 tools, tool_choice auto/required/named, parallel tool "
              "calls, turns carrying tool results"),
    AgentType("vision", 0.05, {"gpt-4o": 0.60, "gpt-4.1": 0.25, "gpt-5": 0.15},
              "screenshots and scanned invoices as image_url parts"),
)

KINDS = (
    Kind("support-triage", "classify", 0.30, (2, 6), "label a ticket from a fixed list; "
         "40% ask for a JSON schema (label + urgent) and answer in 15-25 tokens"),
    Kind("support-triage", "extract", 0.20, (30, 60), "fields of a message as JSON "
         "(json_object 60%, json_schema 40%)"),
    Kind("support-triage", "mood", 0.10, (1, 3), "one-word mood of a customer"),
    Kind("support-triage", "faq", 0.20, (60, 150), "a customer's question, after 0-2 earlier "
         "exchanges"),
    Kind("support-triage", "reply", 0.20, (120, 260), "draft the reply under the refund and "
         "escalation rules; half with 3 tools (look up order, refund, escalate)"),
    Kind("coding", "traceback", 0.25, (300, 900), "fix a failing test: traceback + code"),
    Kind("coding", "agent-step", 0.25, (50, 400), "agent loop: task, a read_file call and "
         "its result, then the next instruction; 6 tools"),
    Kind("coding", "implement", 0.20, (200, 700), "write a function (easy or hard task); "
         "agent with 6 tools 60%, IDE chat panel without tools 40%"),
    Kind("coding", "explain-error", 0.15, (80, 200), "what an error message means (chat "
         "panel, no tools)"),
    Kind("coding", "commit", 0.15, (10, 25), "one-line commit message for a diff"),
    Kind("research-rag", "summarize", 0.30, (150, 350), "five bullet points over the "
         "retrieved documents"),
    Kind("research-rag", "lookup", 0.30, (30, 90), "one fact from the documents, quoted"),
    Kind("research-rag", "compare", 0.20, (300, 700), "compare proposals and recommend one"),
    Kind("research-rag", "multi-hop", 0.20, (150, 400), "a question joining several facts "
         "across documents"),
    Kind("chat-ops", "greeting", 0.15, (5, 20), "hi / thanks / are you there"),
    Kind("chat-ops", "lookup", 0.20, (20, 60), "runbook link, on-call, dashboard (half "
         "with 2 tools)"),
    Kind("chat-ops", "translate", 0.20, (30, 120), "plain sentences (80%) or legal and "
         "medical text (20%)"),
    Kind("chat-ops", "multi-turn", 0.25, (40, 150), "5-11 turns of ops chat, then a short "
         "follow-up"),
    Kind("chat-ops", "judgment", 0.20, (80, 200), "should we roll back / migrate / page: "
         "a short question that needs judgment"),
    Kind("tool-workflow", "single-call", 0.35, (30, 80), "one action among 2-3 tools "
         "(tool_choice auto)"),
    Kind("tool-workflow", "parallel", 0.20, (40, 120), "several look-ups at once "
         "(parallel_tool_calls true)"),
    Kind("tool-workflow", "forced", 0.20, (40, 100), "tool_choice names the function"),
    Kind("tool-workflow", "after-tools", 0.25, (60, 160), "answer from tool results "
         "(2-5 tools offered)"),
    Kind("vision", "screenshot", 0.60, (60, 200), "what error a screenshot shows"),
    Kind("vision", "invoice-scan", 0.40, (40, 120), "total and due date from a scan"),
)


@dataclass(slots=True)
class Req:
    """One request of the workload and what the benchmark knows about it."""

    idx: int
    agent: str
    kind: str
    needs: str               # the author's judgment: small | either | large
    model: str
    body: dict[str, Any]
    output_tokens: int
    shown: str               # what the request asks, for examples in the report
    raw: bytes = b""
    input_tokens: int = 0    # tokenizer count (text + tool and schema JSON + images)
    est_tokens: int = 0      # the features' estimate (what the router prices)
    tier: str = ""
    rule: str = ""


def _tool(name: str, description: str, *params: str) -> dict[str, Any]:
    props = {p: {"type": "string", "description": p.replace("_", " ")} for p in params}
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": props, "required": list(params[:1]),
                       "additionalProperties": False}}}


SUPPORT_SYSTEM = (
    "You are Nova, the support assistant of Northwind Cloud, a subscription service for file "
    "storage, team workspaces and invoicing used by small businesses. Answer in the "
    "customer's language, in a friendly and concise tone, and never invent facts about the "
    "customer's account. Refund rules: a duplicate charge is refunded in full without "
    "escalation; a refund for unused time on a yearly subscription needs a supervisor; we "
    "never refund more than the last 90 days. Escalate to a human when the customer mentions "
    "legal action, a data breach, or asks three times for the same thing. Do not promise "
    "delivery dates for features. For account changes, confirm the workspace name and the "
    "billing email first. Sign every reply as Nova from Northwind Cloud.")
SUPPORT_TOOLS = (
    _tool("lookup_order", "Find an order or invoice by its id.", "order_id"),
    _tool("issue_refund", "Refund an invoice fully or partly.", "invoice_id", "amount"),
    _tool("escalate", "Hand the conversation to a human agent.", "reason"),
)
TICKETS = (
    "I was charged twice for my March invoice, order NW-48213. Please fix this.",
    "The sync client keeps saying quota exceeded although I deleted 40 GB yesterday.",
    "How do I add a second admin to our workspace?",
    "Your app logged me out three times today and now my 2FA codes are rejected.",
    "I want to cancel. The new pricing doubled our bill and nobody told us.",
    "Files shared by link show access denied for external users since this morning.",
    "Can you change the billing email to finance@acme-tools.de? Order NW-51877.",
    "Our team workspace disappeared after the owner left the company. We need the files.",
    "The mobile app crashes when I open a PDF larger than 50 MB on Android 14.",
    "We were promised 20% off for the yearly subscription but invoice NW-50210 shows full "
    "price.",
    "I need a VAT invoice with our company number DE298374651 for order NW-49902.",
    "Is there an outage? Uploads hang at 99% for everyone in our office.",
    "Please delete my account and all my data under GDPR, my email is j.ortiz@example.org.",
    "Invoice NW-50644 lists 14 seats but we only have 9 users. Please correct it.",
    "My colleague's invitation link expired, can you send a new one to lena@brightway.io?",
)
FAQS = (
    ("How do I add a second admin to our workspace?", "small"),
    ("Where can I download all invoices from last year?", "small"),
    ("Do you support SAML single sign-on with Azure AD?", "small"),
    ("Is my data stored in the EU?", "small"),
    ("If I cancel today, will I still be charged for this month?", "either"),
    ("Can I downgrade my plan in the middle of the cycle and get the difference back?",
     "either"),
    ("What is the reason my card was declined twice?", "either"),
    ("Can you calculate what we would pay per year for 37 seats?", "either"),
    ("We are a German company. Does your DPA cover subprocessors in the US, and is that "
     "enough after Schrems II?", "large"),
    ("Our auditor asks whether deleted files are also removed from backups, and when. What "
     "do I tell them?", "large"),
)
FAQ_HISTORY = (
    ("Hi, I have a question about my account.", "Hello! I'm Nova. How can I help you today?"),
    ("We are on the team subscription with 12 seats.",
     "Thanks! I see a Team subscription with 12 seats on the workspace Brightway."),
    ("It's about billing.", "Of course, what would you like to know about billing?"),
)
EXTRACT_SCHEMA = {"type": "json_schema", "json_schema": {"name": "ticket_fields", "strict": True,
                  "schema": {"type": "object", "additionalProperties": False,
                             "required": ["order_id", "product", "customer_email", "action"],
                             "properties": {"order_id": {"type": ["string", "null"]},
                                            "product": {"type": ["string", "null"]},
                                            "customer_email": {"type": ["string", "null"]},
                                            "action": {"type": ["string", "null"]}}}}}
LABEL_SCHEMA = {"type": "json_schema", "json_schema": {"name": "ticket_label", "strict": True,
                "schema": {"type": "object", "additionalProperties": False,
                           "required": ["label", "urgent"],
                           "properties": {"label": {"enum": ["billing", "technical", "account",
                                                             "cancellation", "other"]},
                                          "urgent": {"type": "boolean"}}}}}

CODING_SYSTEM = (
    "You are a senior software engineer working as a coding agent inside the customer's "
    "repository. You can read and write files, search the code, run shell commands and the "
    "test suite through the tools below. Work in small steps: read the relevant code before "
    "changing it, keep changes minimal and in the style of the surrounding code, and run the "
    "tests after every change. Never commit secrets, never disable a failing test to make the "
    "suite pass, never force-push. When a change touches a public API, update its docstring "
    "and the changelog. When you are unsure what the user wants, ask one precise question "
    "instead of guessing. Prefer the standard library over new dependencies; a new "
    "dependency needs the user's approval. Python code follows PEP 8 with a line length of "
    "100 and type hints on every public function; TypeScript code uses strict mode and no "
    "any. Explain what you changed in two or three sentences at the end, then list the files "
    "you touched. If the tests still fail after three attempts, stop and summarise what you "
    "tried and what you suspect, so that a human can take over. The repository is a "
    "billing service: be careful with money amounts (Decimal, never float), time zones (UTC "
    "in storage, the customer's zone in documents) and idempotency of every write endpoint.")
PANEL_SYSTEM = ("You are a helpful programming assistant in an IDE chat panel. Answer "
                "concisely; show code only when asked.")
CODING_TOOLS = (
    _tool("read_file", "Read a file of the repository.", "path"),
    _tool("write_file", "Replace a file's content.", "path", "content"),
    _tool("search_code", "Search the repository with a regular expression.", "pattern"),
    _tool("run_tests", "Run the test suite or one test file.", "target"),
    _tool("run_shell", "Run a shell command in the repository.", "command"),
    _tool("open_pr", "Open a pull request with the current changes.", "title", "body"),
)
TRACEBACKS = (
    ("billing/export.py", "build_rows", "TypeError: unsupported operand type(s) for *: "
     "'decimal.Decimal' and 'NoneType'"),
    ("billing/tax.py", "vat_rate", "KeyError: 'XI'"),
    ("billing/invoices.py", "render_pdf", "ValueError: time data '2026-11-31' does not match "
     "format '%Y-%m-%d'"),
    ("api/handlers.py", "create_invoice", "sqlalchemy.exc.IntegrityError: duplicate key "
     "value violates unique constraint \"invoices_idempotency_key\""),
    ("billing/currency.py", "convert", "decimal.InvalidOperation: [<class "
     "'decimal.ConversionSyntax'>]"),
)
CODE_SNIPPET = '''def build_rows(invoice):
    rows = []
    for item in invoice.items:
        if item.archived:
            continue
        rows.append({"sku": item.sku, "amount": item.unit_price * item.quantity})
    return rows


class Invoice:
    def __init__(self, items, currency="EUR"):
        self.items = items
        self.currency = currency
'''
TASKS = (
    ("returns the n-th Fibonacci number iteratively", "small"),
    ("checks whether a string is a palindrome, ignoring case and punctuation", "small"),
    ("converts a snake_case identifier to camelCase", "small"),
    ("removes duplicates from a list while keeping the original order", "small"),
    ("formats a byte count as a human-readable string like 1.5 MB", "small"),
    ("implements a lock-free single-producer single-consumer ring buffer in Rust", "large"),
    ("expands an RFC 5545 RRULE with BYDAY, BYSETPOS and EXDATE into the dates of a given "
     "range, honouring time zones and daylight saving changes", "large"),
    ("merges two LWW-element-set CRDT replicas and copes with clock skew between nodes",
     "large"),
    ("parses SQL SELECT statements with joins and subqueries into an AST", "large"),
    ("rate-limits requests with a sliding-window log in Redis, atomically, in a Lua script",
     "large"),
)
ERRORS = (
    ("ECONNRESET", "small"),
    ("Segmentation fault (core dumped)", "either"),
    ("ModuleNotFoundError: No module named 'yaml'", "small"),
    ("error[E0502]: cannot borrow `x` as mutable because it is also borrowed as immutable",
     "either"),
    ("fatal: refusing to merge unrelated histories", "small"),
    ("java.lang.OutOfMemoryError: GC overhead limit exceeded", "either"),
)
DIFF = '''diff --git a/billing/export.py b/billing/export.py
--- a/billing/export.py
+++ b/billing/export.py
@@ -85,7 +85,9 @@ def build_rows(invoice):
     rows = []
     for item in invoice.items:
-        rows.append({"sku": item.sku, "amount": item.unit_price * item.quantity})
+        if item.quantity is None:
+            continue
+        rows.append({"sku": item.sku, "amount": item.unit_price * item.quantity})
     return rows
'''
AGENT_NEXT = ("Now run the tests.", "Looks good, open the pull request.",
              "Also update the changelog.", "Try again, the test still fails.",
              "Search for other callers of build_rows and fix them too.")

RAG_SYSTEM = (
    "You are a research assistant for the procurement and finance teams. Answer only from "
    "the documents the user provides; when they do not contain the answer, say so. Cite the "
    "document number for every fact, as [Document 3]. Be precise with figures and dates.")
VENDORS = ("Altura Systems", "Brightline Logistics", "Cobalt Freight", "Dunmore Analytics",
           "Everpine Software", "Fjordline Cloud")
DOC_SENTENCES = (
    "{vendor} quoted an annual licence fee of {price} EUR for {seats} seats, with support on "
    "business days and a first response within {hours} hours.",
    "In {quarter}, {vendor} delivered {pct}% of orders on time; {count} shipments arrived "
    "more than a week late.",
    "The contract with {vendor} renews for twelve months unless either party gives {days} "
    "days' written notice.",
    "Meeting notes, {month}: the team agreed to move the {project} launch by {weeks} weeks "
    "because the security review found {count} open issues.",
    "The {dept} budget for {quarter} was reduced by {pct}% after the hiring freeze, mostly in "
    "contractor spend.",
    "{vendor} stores customer data in {region} and offers a data processing agreement that "
    "allows one audit per year.",
    "Customer satisfaction for {project} fell to {score} out of 10 in {quarter}, with most "
    "complaints about onboarding.",
    "Liability of {vendor} is capped at the fees paid in the previous {months} months, except "
    "for breaches of confidentiality.",
    "The pilot with {vendor} processed {volume} invoices, of which {pct}% needed manual "
    "correction.",
    "According to the audit, {count} controls were effective; the others concern access "
    "reviews and backups.",
)
RAG_QUESTIONS = {
    "summarize": ("Summarize the documents above in five bullet points for the CFO.", "either"),
    "lookup": ("According to the documents, what notice period applies to the {vendor} "
               "contract? Quote the sentence.", "small"),
    "compare": ("Compare the proposals of {vendor} and {vendor2} on price, support terms and "
                "liability, and recommend one.", "large"),
    "multi-hop": ("Which supplier delivered late most often in the quarters where the "
                  "logistics budget was reduced, and what did the late shipments put at "
                  "risk?", "large"),
}

OPS_SYSTEM = ("You are the on-call assistant of the platform team. Be brief. Link runbooks "
              "when you know them. Never run destructive commands yourself.")
OPS_TOOLS = (_tool("get_oncall", "Who is on call for a team.", "team"),
             _tool("search_runbooks", "Search the runbook wiki.", "query"))
SERVICES = ("checkout", "payments-api", "search", "notifications", "auth-gateway", "ledger")
GREETINGS = ("hi", "Hi there!", "thanks, that's all", "good morning", "are you there?",
             "ok great, thank you!", "hello")
OPS_LOOKUPS = ("What's the runbook link for {svc}?", "Who is on call for {svc} this week?",
               "Which Grafana dashboard shows {svc} latency?",
               "What is the staging URL of {svc}?",
               "When is the next maintenance window for {svc}?")
PLAIN_SENTENCES = ("The deploy is finished; please check the dashboard.",
                   "We will be back shortly after the scheduled maintenance.",
                   "Your password was changed. If this was not you, contact support.",
                   "The meeting moved to Thursday at 10 o'clock.",
                   "Thank you for your patience while we fix the issue.")
HARD_SENTENCES = (
    "Translate into German, keeping the legal meaning exact: The processor shall not engage "
    "another processor without prior specific or general written authorisation of the "
    "controller.",
    "Translate into French, keeping the legal meaning exact: The licensee may not sublicense "
    "the software except to its affiliates, provided that the licensee remains liable for "
    "their compliance.",
    "Translate into Spanish for a patient leaflet: Take one tablet twice daily with food; do "
    "not take within 14 days of stopping an MAO inhibitor.",
)
LANGUAGES = ("German", "French", "Spanish", "Japanese", "Portuguese")
JUDGMENTS = (
    "Should we roll back release 4.18? p99 latency went from 310 ms to 460 ms after the "
    "deploy, the error rate is flat at 0.2%, and the release contains the new billing export.",
    "Is it safe to run the migration that adds a NOT NULL column with a default to the "
    "400M-row events table on Postgres 15 during business hours?",
    "Can we raise the connection pool of the payments primary from 50 to 200 without other "
    "changes?",
    "Disk on ledger-db-2 is at 91% and growing 2% a day. Page the database on-call now or "
    "wait for Monday?",
    "The TLS certificate of auth-gateway expires in 36 hours and renewal failed twice. What "
    "should I do first?",
    "Is it OK to restart the Kafka brokers one by one during peak traffic to apply the "
    "security patch?",
)
CHAT_HISTORY = (
    ("Is checkout healthy right now?", "Yes: error rate 0.1%, p99 280 ms over the last hour."),
    ("And payments-api?", "Healthy as well; one brief spike at 09:12 that recovered."),
    ("Who deployed last?", "Marta deployed checkout 4.18 at 08:55."),
    ("Did anything page overnight?", "One page for disk space on ledger-db-2, acknowledged."),
    ("What's the status page saying?", "All systems operational."),
)
CHAT_FOLLOWUPS = ("and what about staging?", "ok, and search?", "any open incidents?",
                  "thanks. anything else I should know before the release?")

WORKFLOW_SYSTEM = ("You are an operations workflow agent. Use the tools to act; confirm what "
                   "you did in one or two sentences.")
WORKFLOW_TOOLS = (
    _tool("get_weather", "Weather forecast for a city.", "city", "date"),
    _tool("book_meeting", "Book a meeting in the shared calendar.", "attendee", "start",
          "duration"),
    _tool("create_ticket", "Create a ticket in the service desk.", "title", "priority"),
    _tool("lookup_customer", "Find a customer record by name or email.", "query"),
    _tool("send_email", "Send an email.", "to", "subject", "body"),
)
PEOPLE = ("Priya Natarajan", "Tom Becker", "Aiko Tanaka", "Luis Ortega", "Grace Okafor")
CITIES = ("Paris", "London", "Tokyo", "Lagos", "Lima", "Oslo")

VISION_PROMPTS = {
    "screenshot": (("What error is shown in this screenshot, and what does it mean?", "either"),
                   ("Which step of the installer failed in this screenshot?", "either")),
    "invoice-scan": (("Read the invoice total and the due date from this scan.", "small"),
                     ("Read the IBAN and the amount from this scanned invoice.", "either")),
}


class Workload:
    """Builds the seeded stream of requests (see AGENTS and KINDS)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.kinds: dict[str, list[Kind]] = defaultdict(list)
        for kind in KINDS:
            self.kinds[kind.agent].append(kind)
        self.builders: dict[str, Callable[[str, str], tuple[dict[str, Any], str, str]]] = {
            "support-triage": self._support, "coding": self._coding,
            "research-rag": self._rag, "chat-ops": self._ops,
            "tool-workflow": self._workflow, "vision": self._vision}

    def build(self) -> list[Req]:
        """The stream: agent, kind and model drawn per request."""
        rng = self.rng
        out: list[Req] = []
        for idx in range(self.n):
            agent = rng.choices(AGENTS, [a.share for a in AGENTS])[0]
            kinds = self.kinds[agent.name]
            kind = rng.choices(kinds, [k.share for k in kinds])[0]
            model = rng.choices(list(agent.models), list(agent.models.values()))[0]
            body, needs, shown = self.builders[agent.name](kind.name, model)
            body = {"model": model, **body}
            self._sampling(body, model, agent.name)
            out_tokens = rng.randint(*kind.out)
            if kind.name == "classify" and "response_format" in body:
                out_tokens = rng.randint(15, 25)
            out.append(Req(idx, agent.name, kind.name, needs, model, body, out_tokens, shown))
        return out

    def _sampling(self, body: dict[str, Any], model: str, agent: str) -> None:
        """Parameters agents add: temperature and max_tokens for GPT-4-class models,
        reasoning_effort and max_completion_tokens for gpt-5 (which refuses sampling)."""
        rng = self.rng
        if model.startswith("gpt-5"):
            if rng.random() < (0.5 if agent in ("coding", "research-rag") else 0.3):
                body["reasoning_effort"] = rng.choice(("minimal", "low", "medium"))
            if rng.random() < 0.3:
                body["max_completion_tokens"] = 4096
            return
        if rng.random() < 0.6:
            body["temperature"] = 0 if agent != "chat-ops" else 0.7
        if rng.random() < 0.2:
            body["max_tokens"] = 1024

    def _support(self, kind: str, model: str) -> tuple[dict[str, Any], str, str]:
        rng = self.rng
        ticket = rng.choice(TICKETS)
        system = {"role": "system", "content": SUPPORT_SYSTEM}
        body: dict[str, Any] = {}
        needs = "small"
        if kind == "classify":
            text = ("Classify the ticket below into exactly one of: billing, technical, "
                    "account, cancellation, other. Answer with the label only.\n\nTicket: "
                    + ticket)
            shown = "Classify (billing/technical/account/cancellation/other): " + ticket
            if rng.random() < 0.4:
                body["response_format"] = LABEL_SCHEMA
        elif kind == "extract":
            text = ("Extract order_id, product, customer_email and action from the message "
                    "below. Use null for a missing field.\n\nMessage: " + ticket)
            shown = "Extract order_id, product, customer_email, action as JSON: " + ticket
            body["response_format"] = (EXTRACT_SCHEMA if rng.random() < 0.4
                                       else {"type": "json_object"})
        elif kind == "mood":
            text = ("Rate the customer's mood as angry, frustrated, neutral or happy. One "
                    "word.\n\n" + ticket)
            shown = "Mood (angry/frustrated/neutral/happy), one word: " + ticket
        elif kind == "faq":
            text, needs = rng.choice(FAQS)
            history: list[dict[str, Any]] = []
            for user, assistant in FAQ_HISTORY[:rng.randint(0, 2)]:
                history += [{"role": "user", "content": user},
                            {"role": "assistant", "content": assistant}]
            body["messages"] = [system, *history, {"role": "user", "content": text}]
            return body, needs, text
        else:
            text = ("Write the reply to this customer. Follow the refund and escalation rules "
                    "in your instructions and promise nothing they do not allow.\n\n" + ticket)
            shown = "Write the reply, following the refund/escalation rules: " + ticket
            needs = "large"
            if rng.random() < 0.5:
                body["tools"] = list(SUPPORT_TOOLS)
        body["messages"] = [system, {"role": "user", "content": text}]
        return body, needs, shown

    def _coding(self, kind: str, model: str) -> tuple[dict[str, Any], str, str]:
        rng = self.rng
        agent_system = {"role": "system", "content": CODING_SYSTEM}
        panel_system = {"role": "system", "content": PANEL_SYSTEM}
        body: dict[str, Any] = {}
        if kind == "traceback":
            path, func, error = rng.choice(TRACEBACKS)
            trace = (f"Traceback (most recent call last):\n  File \"/app/tests/test_billing.py\""
                     f", line 57, in test_export\n    rows = {func}(invoice)\n  File \"/app/"
                     f"{path}\", line 88, in {func}\n    return _convert(value)\n{error}")
            text = (f"The test suite fails with this error, fix it:\n\n{trace}\n\nRelevant "
                    f"code:\n```python\n{CODE_SNIPPET}```")
            body["messages"] = [agent_system, {"role": "user", "content": text}]
            body["tools"] = list(CODING_TOOLS)
            return body, "large", f"The test suite fails with this error, fix it: {error}"
        if kind == "agent-step":
            task = "Make build_rows skip items without a quantity and add a test."
            call = {"id": "call_1", "type": "function", "function": {
                "name": "read_file", "arguments": '{"path": "billing/export.py"}'}}
            nxt = rng.choice(AGENT_NEXT)
            body["messages"] = [
                agent_system, {"role": "user", "content": task},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": CODE_SNIPPET * 3},
                {"role": "assistant", "content": "I read the file; build_rows multiplies "
                 "unit_price by quantity without checking for None."},
                {"role": "user", "content": nxt}]
            body["tools"] = list(CODING_TOOLS)
            body["parallel_tool_calls"] = False
            return body, "large", nxt
        if kind == "implement":
            task, needs = rng.choice(TASKS)
            text = f"Write a function that {task}."
            if rng.random() < 0.6:
                body["messages"] = [agent_system, {"role": "user", "content": text}]
                body["tools"] = list(CODING_TOOLS)
            else:
                body["messages"] = [panel_system, {"role": "user", "content": text}]
            return body, needs, text
        if kind == "explain-error":
            error, needs = rng.choice(ERRORS)
            text = f"What does this error mean: {error}"
            body["messages"] = [panel_system, {"role": "user", "content": text}]
            return body, needs, text
        text = "Write a one-line commit message for this diff:\n\n" + DIFF
        body["messages"] = [panel_system, {"role": "user", "content": text}]
        return body, "small", "Write a one-line commit message for this diff: " + DIFF

    def _document(self, target_chars: int) -> str:
        rng = self.rng
        parts: list[str] = []
        size = doc = 0
        while size < target_chars:
            doc += 1
            head = f"[Document {doc}: {rng.choice(VENDORS)} file {rng.randint(100, 999)}]\n"
            para = [head]
            for _ in range(rng.randint(6, 14)):
                vendor = rng.choice(VENDORS)
                para.append(rng.choice(DOC_SENTENCES).format(
                    vendor=vendor, price=rng.randrange(20_000, 400_000, 500),
                    seats=rng.choice((50, 100, 250, 500)), hours=rng.choice((4, 8, 24)),
                    quarter=f"Q{rng.randint(1, 4)} {rng.choice((2025, 2026))}",
                    pct=rng.randint(3, 97), count=rng.randint(2, 40),
                    days=rng.choice((30, 60, 90)), month=rng.choice(("March", "June", "May")),
                    project=rng.choice(("Atlas", "Harbor", "Nimbus")),
                    weeks=rng.randint(2, 8), dept=rng.choice(("logistics", "marketing", "IT")),
                    region=rng.choice(("Frankfurt", "Dublin", "Virginia")),
                    score=rng.randint(4, 9), months=rng.choice((6, 12, 24)),
                    volume=rng.randint(500, 9000)) + " ")
            text = "".join(para).rstrip() + "\n\n"
            parts.append(text)
            size += len(text)
        return "".join(parts)

    def _rag(self, kind: str, model: str) -> tuple[dict[str, Any], str, str]:
        rng = self.rng
        # Context sizes: 20% small, 50% medium, 30% long (tokens ~ chars / 4).
        bucket = rng.random()
        tokens = (rng.randint(300, 500) if bucket < 0.2 else rng.randint(1_000, 6_000)
                  if bucket < 0.7 else rng.randint(6_000, 40_000))
        context = self._document(tokens * 4)
        question, needs = RAG_QUESTIONS[kind]
        vendor, vendor2 = rng.sample(VENDORS, 2)
        question = question.format(vendor=vendor, vendor2=vendor2)
        text = f"Documents:\n\n{context}Question: {question}"
        body = {"messages": [{"role": "system", "content": RAG_SYSTEM},
                             {"role": "user", "content": text}]}
        return body, needs, f"[{len(context) // 4:,}-token context] {question}"

    def _ops(self, kind: str, model: str) -> tuple[dict[str, Any], str, str]:
        rng = self.rng
        system = {"role": "system", "content": OPS_SYSTEM}
        body: dict[str, Any] = {}
        history: list[dict[str, Any]] = []
        needs = "small"
        if kind == "greeting":
            text = rng.choice(GREETINGS)
        elif kind == "lookup":
            text = rng.choice(OPS_LOOKUPS).format(svc=rng.choice(SERVICES))
            if rng.random() < 0.5:
                body["tools"] = list(OPS_TOOLS)
        elif kind == "translate":
            if rng.random() < 0.2:
                text, needs = rng.choice(HARD_SENTENCES), "large"
            else:
                text = f"Translate into {rng.choice(LANGUAGES)}: {rng.choice(PLAIN_SENTENCES)}"
        elif kind == "multi-turn":
            for user, assistant in CHAT_HISTORY[:rng.randint(2, 5)]:
                history += [{"role": "user", "content": user},
                            {"role": "assistant", "content": assistant}]
            text, needs = rng.choice(CHAT_FOLLOWUPS), "either"
        else:
            text, needs = rng.choice(JUDGMENTS), "large"
        body["messages"] = [system, *history, {"role": "user", "content": text}]
        return body, needs, text

    def _workflow(self, kind: str, model: str) -> tuple[dict[str, Any], str, str]:
        rng = self.rng
        system = {"role": "system", "content": WORKFLOW_SYSTEM}
        body: dict[str, Any] = {}
        person = rng.choice(PEOPLE)
        if kind == "single-call":
            text = f"Book a 30 minute meeting with {person} next Tuesday afternoon."
            body["tools"] = list(WORKFLOW_TOOLS[:rng.randint(2, 3)])
            body["tool_choice"] = "auto"
            needs = "either"
        elif kind == "parallel":
            cities = rng.sample(CITIES, 3)
            text = f"Get tomorrow's weather for {cities[0]}, {cities[1]} and {cities[2]}."
            body["tools"] = list(WORKFLOW_TOOLS[:2])
            body["parallel_tool_calls"] = True
            needs = "small"
        elif kind == "forced":
            text = f"{person} reports that the VPN drops every 10 minutes. File it."
            body["tools"] = list(WORKFLOW_TOOLS[:rng.randint(2, 5)])
            body["tool_choice"] = {"type": "function", "function": {"name": "create_ticket"}}
            needs = "either"
        else:
            text = f"Find {person} in the CRM and email them the renewal reminder."
            call = {"id": "call_7", "type": "function", "function": {
                "name": "lookup_customer", "arguments": orjson.dumps({"query": person}).decode()}}
            record = {"name": person, "email": "contact@example.com", "plan_renews": "2026-12-01",
                      "account_manager": "Tom Becker", "seats": 25}
            body["tools"] = list(WORKFLOW_TOOLS[:rng.randint(2, 5)])
            body["messages"] = [system, {"role": "user", "content": text},
                                {"role": "assistant", "content": None, "tool_calls": [call]},
                                {"role": "tool", "tool_call_id": "call_7",
                                 "content": orjson.dumps(record).decode()}]
            return body, "either", text
        body["messages"] = [system, {"role": "user", "content": text}]
        return body, needs, text

    def _vision(self, kind: str, model: str) -> tuple[dict[str, Any], str, str]:
        rng = self.rng
        text, needs = rng.choice(VISION_PROMPTS[kind])
        url = f"https://files.example.internal/uploads/{rng.randrange(16**8):08x}.png"
        body = {"messages": [{"role": "user", "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]}]}
        return body, needs, text


# ---------------------------------------------------------------- tokens and prices


def _pieces(body: dict[str, Any]) -> tuple[list[str], int, int]:
    """The text a provider bills as input, the message count and the image count."""
    texts: list[str] = []
    images = 0
    messages = body.get("messages") or []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    texts.append(part["text"])
                elif part.get("type") == "image_url":
                    images += 1
        texts.extend(c["function"]["arguments"] for c in msg.get("tool_calls") or ())
    if body.get("tools"):
        texts.append(orjson.dumps(body["tools"]).decode())
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        texts.append(orjson.dumps(fmt["json_schema"]).decode())
    return texts, len(messages), images


def count_tokens(reqs: Sequence[Req]) -> dict[str, Any]:
    """Input tokens per request with the shipped WordPiece tokenizer, and its agreement with
    the features' chars/4 estimate."""
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    jobs: list[tuple[int, str]] = []
    for i, req in enumerate(reqs):
        texts, messages, images = _pieces(req.body)
        req.input_tokens = 3 + TOKENS_PER_MESSAGE * messages + IMAGE_TOKENS * images
        jobs += [(i, t) for t in texts if t]
    for start in range(0, len(jobs), 512):
        chunk = jobs[start:start + 512]
        encoded = tokenizer.encode_batch([t for _, t in chunk], add_special_tokens=False)
        for (i, _), enc in zip(chunk, encoded, strict=True):
            reqs[i].input_tokens += len(enc.ids)
    total = sum(r.input_tokens for r in reqs)
    est = sum(r.est_tokens for r in reqs)
    ratios = sorted(r.est_tokens / r.input_tokens for r in reqs if r.input_tokens)
    return {"tokenizer_total": total, "estimate_total": est,
            "estimate_over_tokenizer": est / total if total else float("nan"),
            "ratio_p10": _pct_of(ratios, 0.10), "ratio_p50": _pct_of(ratios, 0.50),
            "ratio_p90": _pct_of(ratios, 0.90)}


def _pct_of(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def price(catalog: Catalog, model: str, req: Req) -> float:
    """USD for ``req`` answered by ``model``: catalog list prices, no cache discount."""
    spec = catalog.get(model)
    assert spec is not None, model
    return spec.input_price * req.input_tokens + spec.output_price * req.output_tokens


# ---------------------------------------------------------------- part 3: decisions, money


def make_routers(catalog: Catalog) -> dict[str, Router]:
    """One Router per policy set, all with the shipped classifier rules."""
    classifier = Classifier(load_default_rules())
    return {name: Router(catalog, policies, classifier, DEFAULT_OUTPUT_TOKENS)
            for name, policies in POLICIES.items()}


def identity_of(req: Req) -> Identity:
    return Identity(namespace=NAMESPACE, tenant="t-bench", agent=req.agent)


def decide_all(reqs: Sequence[Req], canon: Sequence[CanonicalRequest],
               routers: dict[str, Router]) -> dict[str, dict[str, list[RouteDecision]]]:
    """Every request decided by every router at every budget level."""
    out: dict[str, dict[str, list[RouteDecision]]] = {}
    for name, router in routers.items():
        out[name] = {level: [router.decide(c, identity_of(r), budget_level=level)
                             for r, c in zip(reqs, canon, strict=True)] for level in LEVELS}
    return out


def money(reqs: Sequence[Req], decisions: dict[str, dict[str, list[RouteDecision]]],
          catalog: Catalog) -> dict[str, Any]:
    """Cost per policy and budget level; at hard, what the stage would deny."""
    base = sum(price(catalog, r.model, r) for r in reqs)
    out: dict[str, Any] = {"baseline_usd": base, "policies": {}}
    for name, levels in decisions.items():
        doc: dict[str, Any] = {}
        for level, decs in levels.items():
            cost = 0.0
            denied = 0
            rewritten = 0
            for req, dec in zip(reqs, decs, strict=True):
                if level == "hard" and dec.reason != "budget_cheapest":
                    # RouteStage: at hard, only a budget_cheapest decision is sent on.
                    denied += 1
                    continue
                cost += price(catalog, dec.routed, req)
                rewritten += dec.rewritten
            doc[level] = {"cost_usd": cost, "savings": 1 - cost / base if base else 0.0,
                          "rewritten": rewritten, "denied": denied}
        out["policies"][name] = doc
    return out


def _share(n: int, d: int) -> float:
    return n / d if d else float("nan")


def breakdown(reqs: Sequence[Req], decisions: dict[str, dict[str, list[RouteDecision]]],
              catalog: Catalog) -> dict[str, Any]:
    """Tiers, rewrites per tier / agent / requested model / need label, moves, savings."""
    tiers = Counter(r.tier for r in reqs)
    spend: dict[str, float] = defaultdict(float)
    for r in reqs:
        spend[r.tier] += price(catalog, r.model, r)
    out: dict[str, Any] = {"tiers": dict(tiers), "tier_spend": dict(spend),
                           "per_agent_tiers": {}, "rules": {}, "policies": {}}
    for agent in AGENTS:
        mine = [r for r in reqs if r.agent == agent.name]
        out["per_agent_tiers"][agent.name] = {
            "n": len(mine), **{t: sum(r.tier == t for r in mine) for t in TIERS}}
    for agent in AGENTS:
        rules = Counter(r.rule for r in reqs if r.agent == agent.name)
        out["rules"][agent.name] = rules.most_common()
    for name, levels in decisions.items():
        decs = levels["ok"]
        pol: dict[str, Any] = {"per_tier": {}, "per_agent": {}, "per_model": {}, "per_need": {},
                               "moves": Counter(), "reasons": Counter(d.reason for d in decs),
                               "per_kind": {}}
        for tier in TIERS:
            idx = [i for i, r in enumerate(reqs) if r.tier == tier]
            pol["per_tier"][tier] = (sum(decs[i].rewritten for i in idx), len(idx))
        for key, attr in (("per_agent", "agent"), ("per_model", "model"), ("per_need", "needs"),
                          ("per_kind", "kind")):
            groups: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(reqs):
                groups[f"{r.agent}/{r.kind}" if attr == "kind" else getattr(r, attr)].append(i)
            pol[key] = {g: (sum(decs[i].rewritten for i in idx), len(idx),
                            sum(price(catalog, reqs[i].model, reqs[i])
                                - price(catalog, decs[i].routed, reqs[i]) for i in idx))
                        for g, idx in groups.items()}
        for r, d in zip(reqs, decs, strict=True):
            if d.rewritten:
                pol["moves"][f"{r.model} -> {d.routed} ({r.tier})"] += 1
        out["policies"][name] = pol
    return out


def examples(reqs: Sequence[Req], decisions: dict[str, dict[str, list[RouteDecision]]],
             seed: int) -> dict[str, Any]:
    """Concrete prompts: moved by each policy (one per distinct prompt, riskiest first), and
    prompts that stayed, with the rule that kept them."""
    rng = random.Random(seed + 1)
    rank = {"large": 0, "either": 1, "small": 2}
    out: dict[str, Any] = {}
    for name in ("conservative", "wide"):
        decs = decisions[name]["ok"]
        seen: dict[str, tuple[Req, RouteDecision, int]] = {}
        for r, d in zip(reqs, decs, strict=True):
            if not d.rewritten:
                continue
            key = f"{r.kind}|{r.shown}"
            if key in seen:
                prev = seen[key]
                seen[key] = (prev[0], prev[1], prev[2] + 1)
            else:
                seen[key] = (r, d, 1)
        moved = list(seen.values())
        rng.shuffle(moved)
        moved.sort(key=lambda item: rank[item[0].needs])
        # Diversity: at most two examples per request kind.
        picked: list[tuple[Req, RouteDecision, int]] = []
        per_kind: Counter[str] = Counter()
        for item in moved:
            if per_kind[item[0].kind] < 2:
                picked.append(item)
                per_kind[item[0].kind] += 1
        out[name] = {"distinct_moved": len(moved), "shown": [
            {"agent": r.agent, "kind": r.kind, "needs": r.needs, "tier": r.tier,
             "from": r.model, "to": d.routed, "times": n, "text": _clip(r.shown)}
            for r, d, n in picked[:15]]}
    # Stayed under conservative: one per deciding rule, for models a policy covers.
    stayed: dict[str, int] = {}
    cons, wide = decisions["conservative"]["ok"], decisions["wide"]["ok"]
    order = list(range(len(reqs)))
    rng.shuffle(order)
    for i in order:
        r = reqs[i]
        if not cons[i].rewritten and r.model != "gpt-4o-mini" and r.rule not in stayed:
            stayed[r.rule] = i
    out["stayed"] = [{"rule": rule, "agent": reqs[i].agent, "kind": reqs[i].kind,
                      "needs": reqs[i].needs, "tier": reqs[i].tier,
                      "wide": f"-> {wide[i].routed}" if wide[i].rewritten else "stays",
                      "text": _clip(reqs[i].shown)} for rule, i in stayed.items()]
    return out


def _clip(text: str, limit: int = 100) -> str:
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


# ---------------------------------------------------------------- part 1: decision cost


def _percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1000

    return {"n": n, "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p99.9": at(0.999),
            "max": ordered[-1] / 1000, "mean": statistics.fmean(ordered) / 1000}


def time_decisions(reqs: Sequence[Req], canon: Sequence[CanonicalRequest],
                   routers: dict[str, Router], total: int) -> dict[str, Any]:
    """Per call, in microseconds: parse_request, then decide with each router."""
    idents = [identity_of(r) for r in reqs]
    raws = [r.raw for r in reqs]
    n = len(reqs)
    chat = Endpoint.CHAT
    calls: dict[str, Callable[[int], object]] = {
        "parse_request": lambda i: parse_request(chat, raws[i]),
        "features_of": lambda i: features_of(chat, canon[i].body)}
    for name, router in routers.items():
        calls[f"decide:{name}"] = _decider(router, canon, idents)
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {name: [] for name in calls}
    which: dict[str, list[int]] = {name: [] for name in calls}
    for call in calls.values():
        for i in range(WARMUP):
            call(i % n)
    block = max(1, total // ROUNDS)
    position = 0
    for _ in range(ROUNDS):
        for name, call in calls.items():
            gc.collect()
            out, idx = samples[name], which[name]
            for k in range(position, position + block):
                i = k % n
                start = clock()
                call(i)
                out.append(clock() - start)
                idx.append(i)
        position += block
    result: dict[str, Any] = {name: _percentiles(s) for name, s in samples.items()}
    # The wide policy per agent type: where the slow decisions come from.
    per_agent: dict[str, dict[str, float]] = {}
    for agent in AGENTS:
        mine = [s for s, i in zip(samples["decide:wide"], which["decide:wide"], strict=True)
                if reqs[i].agent == agent.name]
        if mine:
            per_agent[agent.name] = _percentiles(mine)
    long_turn = [_last_user_chars(r) > SPLIT_CHARS for r in reqs]
    for label, wanted in ((f"last user turn <= {SPLIT_CHARS:,} chars", False),
                          (f"last user turn > {SPLIT_CHARS:,} chars", True)):
        mine = [s for s, i in zip(samples["decide:wide"], which["decide:wide"], strict=True)
                if long_turn[i] is wanted]
        if mine:
            per_agent[label] = _percentiles(mine)
    result["wide_per_agent"] = per_agent
    timer = []
    for _ in range(20_000):
        start = clock()
        timer.append(clock() - start)
    result["timer_overhead"] = _percentiles(timer)
    return result


def _decider(router: Router, canon: Sequence[CanonicalRequest],
             idents: Sequence[Identity]) -> Callable[[int], object]:
    return lambda i: router.decide(canon[i], idents[i])


def _lowered(text: str) -> str:
    """What features_of scans for words: the tail, lowercased, separators as spaces."""
    lowered = " " + text.lower()
    for separator in feat._WORD_SEPARATORS:
        if separator in lowered:
            lowered = lowered.replace(separator, " ")
    return lowered


def time_feature_parts(reqs: Sequence[Req], canon: Sequence[CanonicalRequest],
                       repeat: int) -> dict[str, Any]:
    """Where features_of spends its time on long last user turns: its scans one by one, on
    the same text (the last 8,000 chars), and the word scan over only the last 2,000."""
    tails = [feat._tail_text(c.body["messages"][-1]["content"])
             for r, c in zip(reqs, canon, strict=True) if _last_user_chars(r) > SPLIT_CHARS]
    if not tails:
        return {}
    lows = [_lowered(t) for t in tails]
    parts: dict[str, Callable[[int], object]] = {
        "lowercase + separators": lambda i: _lowered(tails[i]),
        "code hints (_looks_like_code)": lambda i: feat._looks_like_code(tails[i]),
        "math (_looks_like_math)": lambda i: feat._looks_like_math(tails[i], lows[i]),
        "cue and math words (_words)": lambda i: feat._words(lows[i]),
        "what-if: _words on the last 2,000 chars only": lambda i: feat._words(
            lows[i][-SPLIT_CHARS:]),
    }
    clock = time.perf_counter_ns
    out: dict[str, Any] = {"requests": len(tails),
                           "mean_chars": statistics.fmean(len(t) for t in tails)}
    for name, call in parts.items():
        samples: list[int] = []
        for _ in range(repeat):
            for i in range(len(tails)):
                start = clock()
                call(i)
                samples.append(clock() - start)
        out[name] = _percentiles(samples)
    return out


def _last_user_chars(req: Req) -> int:
    for msg in reversed(req.body["messages"]):
        if msg.get("role") == "user":
            content = msg["content"]
            if isinstance(content, str):
                return len(content)
            return sum(len(p.get("text", "")) for p in content)
    return 0


# ---------------------------------------------------------------- part 2: through a sidecar


SIDECARS: dict[str, RoutingConfig] = {
    "none": RoutingConfig(retry=RetryConfig(max_retries=0)),
    "conservative": RoutingConfig(preset="conservative", retry=RetryConfig(max_retries=0)),
    "wide": RoutingConfig(policies=WIDE, retry=RetryConfig(max_retries=0)),
}


@dataclass(slots=True)
class SidecarSamples:
    """What the client saw from one sidecar."""

    overhead_ms: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    rewritten: list[bool] = field(default_factory=list)
    mismatches: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def _send(session: aiohttp.ClientSession, url: str, req: Req
                ) -> tuple[int, float, float | None, str]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
               "x-agent-id": req.agent}
    start = time.perf_counter()
    async with session.post(url, data=req.raw, headers=headers) as resp:
        await resp.read()
        elapsed = (time.perf_counter() - start) * 1000
        overhead = resp.headers.get("x-sidecar-overhead-ms")
        return (resp.status, elapsed, float(overhead) if overhead else None,
                resp.headers.get("x-sidecar-model-routed", ""))


async def through_sidecars(reqs: Sequence[Req],
                           expected: dict[str, list[RouteDecision]]) -> dict[str, Any]:
    """The requests through three sidecars in turn (rotating order), one at a time."""
    mock = MockUpstream(MockConfig())
    mock_url = await mock.start()
    samples = {name: SidecarSamples() for name in SIDECARS}
    try:
        async with contextlib.AsyncExitStack() as stack:
            urls: dict[str, str] = {}
            for name, routing in SIDECARS.items():
                cfg = SidecarConfig(upstream=UpstreamConfig(base_url=mock_url),
                                    cache=CacheConfig(enabled=False),
                                    logging=LoggingConfig(level="warning"), routing=routing)
                app = build_app(cfg, env={"OTEL_SDK_DISABLED": "true"})
                base = await stack.enter_async_context(running(app, cfg, port=0))
                urls[name] = base + "/v1/chat/completions"
            session = await stack.enter_async_context(aiohttp.ClientSession())
            names = list(SIDECARS)
            for req in reqs[:SIDECAR_WARMUP]:
                for name in names:
                    await _send(session, urls[name], req)
            for k, req in enumerate(reqs):
                for j in range(len(names)):
                    name = names[(k + j) % len(names)]
                    status, elapsed, overhead, routed = await _send(session, urls[name], req)
                    s = samples[name]
                    if status != 200 or overhead is None:
                        s.errors[str(status)] += 1
                        continue
                    s.overhead_ms.append(overhead)
                    s.latency_ms.append(elapsed)
                    s.rewritten.append(routed != req.model)
                    if routed != expected[name][req.idx].routed:
                        s.mismatches += 1
    finally:
        await mock.stop()
    out: dict[str, Any] = {"requests": len(reqs), "mock_models": dict(mock.stats.models)}
    for name, s in samples.items():
        moved = [o for o, w in zip(s.overhead_ms, s.rewritten, strict=True) if w]
        kept = [o for o, w in zip(s.overhead_ms, s.rewritten, strict=True) if not w]
        out[name] = {"overhead_ms": _ms_percentiles(s.overhead_ms),
                     "latency_ms": _ms_percentiles(s.latency_ms),
                     "overhead_rewritten_ms": _ms_percentiles(moved),
                     "overhead_kept_ms": _ms_percentiles(kept),
                     "rewritten": sum(s.rewritten), "mismatches": s.mismatches,
                     "errors": dict(s.errors)}
    return out


def _ms_percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    n = len(ordered)
    return {"n": n, "mean": statistics.fmean(ordered),
            **{f"p{q}": ordered[min(n - 1, int(q / 100 * n))] for q in (50, 90, 99, 99.9)}}


# ---------------------------------------------------------------- the report


def _usd(x: float) -> str:
    return f"${x:,.2f}" if abs(x) >= 1 else f"${x:.4f}"


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _revision() -> str:
    """The checked-out commit, read from .git without running git."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7]
        ref = head[5:]
        path = git / ref
        if path.exists():
            return path.read_text().strip()[:7] + f" ({ref.rsplit('/', 1)[-1]})"
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line[:7] + f" ({ref.rsplit('/', 1)[-1]})"
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "aiohttp": aiohttp.__version__,
            "loadavg_start": os.getloadavg(), "revision": _revision()}


def _decision_section(t: dict[str, Any], quick: bool) -> list[str]:
    rows = []
    labels = {"parse_request": "`parse_request` alone (reference)",
              "features_of": "`features_of` alone (inside every decide)",
              "decide:none": "decide, no policy (baseline)",
              "decide:conservative": "decide, `CONSERVATIVE` preset",
              "decide:wide": "decide, `WIDE` policy"}
    for key, label in labels.items():
        c = t[key]
        verdict = "" if not key.startswith("decide") else (
            "**met**" if c["p99"] < TARGET_P99_US else "**not met**")
        rows.append([label, f"{c['n']:,}", f"{c['p50']:.2f}", f"{c['p90']:.2f}",
                     f"{c['p99']:.2f}", f"{c['p99.9']:.2f}", f"{c['max']:.0f}", verdict])
    lines = ["## 1. Decision cost in-process", "",
             f"`Router.decide(canonical, identity)` at budget level ok, timed per call over the "
             f"workload's requests (already parsed) in turn, {ROUNDS} interleaved rounds per "
             f"cell after {WARMUP:,} warm-up calls each; GC on (collected before each block). "
             f"The timer's own cost is included (p50 {t['timer_overhead']['p50']:.2f} {US}). "
             f"Target: p99 < {TARGET_P99_US:.0f} {US}." + (" **Quick run: fewer than 20,000 "
                                                            "decisions per cell.**" if quick
                                                            else ""), ""]
    lines += _table(["cell", "calls", f"p50 {US}", f"p90 {US}", f"p99 {US}", f"p99.9 {US}",
                     f"max {US}", f"p99 < {TARGET_P99_US:.0f} {US}"], rows)
    lines += ["", f"`WIDE` by agent type and by the size of the last user turn (the part "
              f"features_of scans, up to its last 8,000 chars); same samples, in {US}:", ""]
    rows = [[agent, f"{c['n']:,}", f"{c['p50']:.2f}", f"{c['p99']:.2f}", f"{c['p99.9']:.2f}"]
            for agent, c in t["wide_per_agent"].items()]
    lines += _table(["requests", "calls", "p50", "p99", "p99.9"], rows)
    parts = t.get("feature_parts") or {}
    if parts:
        lines += ["", f"Where `features_of` spends it on the {parts['requests']:,} requests whose "
                  f"last user turn is over {SPLIT_CHARS:,} chars (mean scanned "
                  f"{parts['mean_chars']:,.0f} chars): its scans timed one by one on the same "
                  f"text, in {US}:", ""]
        rows = [[name, f"{c['p50']:.2f}", f"{c['p99']:.2f}"] for name, c in parts.items()
                if isinstance(c, dict)]
        lines += _table(["scan", "p50", "p99"], rows)
    return [*lines, ""]


def _sidecar_section(s: dict[str, Any]) -> list[str]:
    lines = ["## 2. Through a sidecar: the route stage end to end", "",
             f"{s['requests']:,} requests (+{SIDECAR_WARMUP} warm-up) sent to each of three "
             "in-process sidecars in turn, rotating which goes first, one request at a time; "
             "all three and the mock share this process and event loop (uvloop), so the "
             "client-side latency includes the mock's work too. Response cache off. The "
             "routed model each sidecar announced was checked against the in-process "
             "decision of the same policy.", ""]
    base = s["none"]
    rows = []
    for name in SIDECARS:
        d = s[name]
        o, lat = d["overhead_ms"], d["latency_ms"]
        rows.append([name, f"{o['n']:,}", f"{o['p50']:.3f}", f"{o['p90']:.3f}",
                     f"{o['p99']:.3f}", f"{o['p99.9']:.3f}",
                     f"{o['p50'] - base['overhead_ms']['p50']:+.3f}",
                     f"{o['p99'] - base['overhead_ms']['p99']:+.3f}",
                     f"{lat['p50']:.3f}", f"{lat['p99']:.3f}",
                     f"{d['rewritten']:,}", str(d["mismatches"]),
                     ", ".join(f"{k}: {v}" for k, v in d["errors"].items()) or "0"])
    lines += _table(["sidecar", "ok", "overhead p50 ms", "p90", "p99", "p99.9",
                     "p50 vs none", "p99 vs none", "client p50 ms", "client p99 ms",
                     "rewritten", "decision mismatches", "errors"], rows)
    wide = s["wide"]
    if wide["overhead_rewritten_ms"].get("n") and wide["overhead_kept_ms"].get("n"):
        r, k = wide["overhead_rewritten_ms"], wide["overhead_kept_ms"]
        lines += ["", f"`wide` split: rewritten requests ({r['n']:,}) overhead p50 "
                  f"{r['p50']:.3f} / p99 {r['p99']:.3f} ms; kept ({k['n']:,}) p50 "
                  f"{k['p50']:.3f} / p99 {k['p99']:.3f} ms (a rewrite re-encodes the body "
                  "with orjson; kept requests include the long RAG contexts)."]
    models = ", ".join(f"{m}: {n:,}" for m, n in sorted(s["mock_models"].items()))
    lines += ["", f"Models the mock upstream received (all sidecars, warm-up included): "
              f"{models}.", ""]
    return lines


def _workload_section(w: dict[str, Any], reqs: Sequence[Req], tok: dict[str, Any]
                      ) -> list[str]:
    n = len(reqs)
    lines = ["## The workload", "",
             f"{n:,} chat requests, seed {w['seed']}, drawn request by request: agent type "
             "by share, then a request kind of that agent, then the requested model by the "
             "agent's model mix. Output tokens per request: uniform in the kind's range "
             "(the same for whichever model answers: a smaller model may in fact answer at "
             "another length, and gpt-5-family models bill hidden reasoning tokens as "
             "output, which this does not model).", ""]
    rows = []
    for agent in AGENTS:
        mine = [r for r in reqs if r.agent == agent.name]
        models = Counter(r.model for r in mine)
        rows.append([agent.name, f"{len(mine):,} ({_pct(len(mine) / n, 0)})",
                     ", ".join(f"{m} {_pct(c / len(mine), 0)}" for m, c in models.most_common()),
                     agent.about])
    lines += _table(["agent type", "requests", "models asked for", "what it sends"], rows)
    lines += [""]
    rows = []
    for kind in KINDS:
        mine = [r for r in reqs if r.agent == kind.agent and r.kind == kind.name]
        needs = Counter(r.needs for r in mine)
        rows.append([kind.agent, kind.name, f"{len(mine):,}", f"{kind.out[0]}-{kind.out[1]}",
                     ", ".join(f"{k} {v}" for k, v in sorted(needs.items())), kind.about])
    lines += _table(["agent type", "kind", "requests", "output tokens", "needs (author)",
                     "what"], rows)
    models = Counter(r.model for r in reqs)
    lines += ["", "Requested models overall: " + ", ".join(
        f"{m} {c:,} ({_pct(c / n)})" for m, c in models.most_common()) + ".", "",
        "*Needs* is the benchmark author's judgment per request template, not a measurement: "
        + "; ".join(f"**{k}** = {v}" for k, v in NEEDS.items()) + ".", "",
        f"Input tokens: counted with the WordPiece tokenizer shipped for the semantic cache "
        f"(`{TOKENIZER.relative_to(ROOT)}`, BERT-uncased vocabulary, not OpenAI's o200k) over "
        f"message text, tool-call arguments, the tools' JSON and a response schema's JSON, "
        f"plus {TOKENS_PER_MESSAGE} per message and {IMAGE_TOKENS} per image (gpt-4o's count "
        f"for a 1024x1024 high-detail image, applied to every model alike). Total "
        f"{tok['tokenizer_total']:,} tokens; the features' estimate the router prices with "
        f"(chars / 4 + 4 per message, no tools, no images) totals {tok['estimate_total']:,} "
        f"({tok['estimate_over_tokenizer']:.2f}x; per request p10/p50/p90 of estimate / count "
        f"= {tok['ratio_p10']:.2f} / {tok['ratio_p50']:.2f} / {tok['ratio_p90']:.2f}).", ""]
    return lines


def _policy_text() -> list[str]:
    def fmt(policies: Sequence[RoutePolicyConfig]) -> list[str]:
        out = []
        for p in policies:
            tiers = "; ".join(f"{t} -> {', '.join(m)}" for t, m in p.tiers.items())
            out.append(f"  - `{'`, `'.join(p.substitute)}`: {tiers}")
        return out

    return ["Policies compared (budget level ok unless stated):", "",
            "- **none**: no routing, every request on its requested model.",
            "- **conservative** (`routing.preset: conservative`, the shipped `CONSERVATIVE`); "
            "simple tier only, within a family:", *fmt(CONSERVATIVE),
            "- **wide** (example policy `WIDE` in this script); simple and standard tiers, "
            "across the gpt-4o/gpt-4.1 families, complex never touched (candidates cheapest "
            "first, the first that fits is taken):", *fmt(WIDE),
            "- gpt-4o-mini requests are covered by no policy in either (they stay).", ""]


def _money_section(m: dict[str, Any], b: dict[str, Any], n: int) -> list[str]:
    lines = ["## 3. Money: cost with and without routing", "", *_policy_text()]
    rows = []
    for name, doc in m["policies"].items():
        ok = doc["ok"]
        rows.append([name, _usd(ok["cost_usd"]), f"**{_pct(ok['savings'])}**",
                     f"{ok['rewritten']:,} ({_pct(ok['rewritten'] / n)})",
                     _usd(ok["cost_usd"] / n * 1000)])
    lines += _table(["policy", "cost", "savings vs none", "requests rewritten",
                     "per 1,000 requests"], rows)
    lines += ["", f"Baseline (none): {_usd(m['baseline_usd'])} for {n:,} requests. Prices: the "
              f"shipped catalog (`proxy/routing/data/catalog.yaml`), list prices, no cached-"
              f"input discount.", "", "### Rewritten per tier (budget level ok)", ""]
    tiers, spend = b["tiers"], b["tier_spend"]
    spend_total = sum(spend.values())
    rows = []
    for tier in TIERS:
        row = [tier, f"{tiers.get(tier, 0):,} ({_pct(tiers.get(tier, 0) / n)})",
               f"{_usd(spend.get(tier, 0.0))} ({_pct(spend.get(tier, 0.0) / spend_total)})"]
        for name in ("conservative", "wide"):
            moved, count = b["policies"][name]["per_tier"][tier]
            row.append(f"{moved:,} ({_pct(_share(moved, count))})")
        rows.append(row)
    lines += _table(["tier", "requests", "spend without routing", "conservative: rewritten",
                     "wide: rewritten"], rows)
    lines += ["", "### Rewritten and saved per agent type and per requested model", ""]
    rows = []
    for key, label in (("per_agent", "agent"), ("per_model", "model")):
        groups = b["policies"]["wide"][key]
        for g in groups:
            row = [f"{label}: {g}", f"{groups[g][1]:,}"]
            for name in ("conservative", "wide"):
                moved, total, saved = b["policies"][name][key][g]
                row += [f"{moved:,} ({_pct(_share(moved, total))})", _usd(saved)]
            rows.append(row)
    lines += _table(["group", "requests", "conservative: rewritten", "saved", "wide: rewritten",
                     "saved"], rows)
    lines += ["", "### Where requests went (budget level ok)", ""]
    for name in ("conservative", "wide"):
        moves = b["policies"][name]["moves"]
        lines.append(f"- **{name}**: " + (", ".join(
            f"{k}: {v:,}" for k, v in sorted(moves.items(), key=lambda kv: -kv[1]))
            or "nothing moved") + ".")
        reasons = b["policies"][name]["reasons"]
        lines.append("  Decision reasons: " + ", ".join(
            f"{k} {v:,}" for k, v in reasons.most_common()) + ".")
    return [*lines, ""]


def _tier_section(b: dict[str, Any]) -> list[str]:
    lines = ["## The classifier's tiers per agent type", "",
             "Shipped rules (`proxy/routing/data/classifier.yaml`), first match wins.", ""]
    rows = []
    for agent, d in b["per_agent_tiers"].items():
        n = d["n"]
        rules = ", ".join(f"{r} {c}" for r, c in b["rules"][agent][:5])
        rows.append([agent, f"{n:,}", *(f"{d[t]:,} ({_pct(_share(d[t], n), 0)})"
                                        for t in TIERS), rules])
    lines += _table(["agent type", "requests", "simple", "standard", "complex",
                     "deciding rules (top 5)"], rows)
    lines += ["", "Per request kind (share rewritten by conservative / wide):", ""]
    rows = []
    cons, wide = b["policies"]["conservative"]["per_kind"], b["policies"]["wide"]["per_kind"]
    for key in sorted(wide):
        moved_c, total, _ = cons[key]
        moved_w, _, _ = wide[key]
        rows.append([key, f"{total:,}", _pct(_share(moved_c, total), 0),
                     _pct(_share(moved_w, total), 0)])
    lines += _table(["agent/kind", "requests", "conservative", "wide"], rows)
    return [*lines, ""]


def _risk_section(b: dict[str, Any], ex: dict[str, Any]) -> list[str]:
    lines = ["## Quality risk: what each policy moves", "",
             "No answer quality is measured here (the mock answers with filler). What the "
             "benchmark can say is which requests move, against the author's judgment of what "
             "each request needs:", ""]
    rows = []
    for need in NEEDS:
        row = [need]
        for name in ("conservative", "wide"):
            moved, total, _ = b["policies"][name]["per_need"].get(need, (0, 0, 0.0))
            row.append(f"{moved:,} of {total:,} ({_pct(_share(moved, total))})")
        rows.append(row)
    lines += _table(["needs (author)", "conservative: moved", "wide: moved"], rows)
    for name in ("conservative", "wide"):
        shown = ex[name]["shown"]
        lines += ["", f"### Moved by {name} ({ex[name]['distinct_moved']} distinct prompts; "
                  "up to 15 shown, those judged *large* first, at most two per kind)", ""]
        rows = [[e["agent"], e["kind"], e["needs"], e["tier"], f"{e['from']} -> {e['to']}",
                 str(e["times"]), e["text"]] for e in shown]
        lines += _table(["agent", "kind", "needs", "tier", "move", "times", "prompt"], rows)
    lines += ["", "### Stayed under conservative (one example per deciding rule, requested "
              "model covered by a policy), and what wide did with it", ""]
    rows = [[e["rule"], e["tier"], e["agent"], e["kind"], e["needs"], e["wide"], e["text"]]
            for e in ex["stayed"]]
    lines += _table(["rule", "tier", "agent", "kind", "needs", "wide", "prompt"], rows)
    return [*lines, ""]


def _budget_section(m: dict[str, Any], n: int) -> list[str]:
    lines = ["## Routing under budgets", "",
             "A budget past its `soft_share` sends requests one tier down (complex is decided "
             "as standard, standard as simple); at its limit with `on_hard: cheapest` only "
             "the covering policy's cheapest fitting candidate is allowed and everything else "
             "is denied with 429 (`on_hard: deny`, the default, denies all). Same requests, "
             "every one at the given level:", ""]
    rows = []
    base = m["baseline_usd"]
    for name, doc in m["policies"].items():
        row = [name]
        for level in LEVELS:
            d = doc[level]
            cell = f"{_usd(d['cost_usd'])} ({_pct(d['savings'])}; {d['rewritten']:,} moved"
            cell += f", {d['denied']:,} denied)" if level == "hard" else ")"
            row.append(cell)
        rows.append(row)
    lines += _table(["policy", "ok", "soft (one tier down)", "hard, on_hard: cheapest"], rows)
    lines += ["", f"Savings are against the no-routing baseline {_usd(base)}; at hard, denied "
              f"requests cost nothing and are not answered either, so that column's saving is "
              f"partly requests not served (of {n:,}).", ""]
    return lines


READING_STATIC = [
    "- **What the conservative default deliberately does not do.** It never touches the "
    "standard or complex tiers: tool use, JSON mode, medium-length prompts, multi-turn chats "
    "over four turns, all stay on the requested model. It stays within a model family and "
    "provider (gpt-4o -> gpt-4o-mini, gpt-4.1 -> gpt-4.1-mini, gpt-5 -> gpt-5-mini; the one "
    "exception is the retired gpt-4-turbo -> gpt-4o-mini), never moves between reasoning "
    "and non-reasoning models, has no cost ceilings, and leaves unlisted models "
    "(gpt-4o-mini, o-series, other providers) alone. A request the classifier calls simple "
    "still moves only if the smaller model has every capability it uses and fits its "
    "context.",
    "- **What could go wrong.** The short-plain rule sees length, turns and surface cues, not "
    "stakes. A short question that needs judgment (a rollback decision, a migration on a big "
    "table, a legal or medical translation, a hard coding task phrased in one sentence, a "
    "customer reply bound by refund rules) looks exactly like a look-up, and both policies "
    "move it. The wide policy additionally moves the standard tier: medium RAG contexts "
    "with multi-hop questions, tool calls among 2-3 tools, chats over four turns; there "
    "the risk is a plausible but wrong answer, a wrong tool argument or a "
    "missed fact, which nothing in the sidecar would notice. Mitigations that exist: "
    "`x-sidecar-route: off` or `x-sidecar-tier: complex` per request, a narrower policy "
    "per agent (`match.agent`), `mode: dry_run` to see the decisions first.",
    "- **Misses the other way (costs money, not quality).** Cue words fire on everyday "
    "support language: \"plan\" (a subscription plan), \"reason\", \"calculate\" send FAQ "
    "questions to complex; every request of an agent that offers more than three tools is "
    "complex whatever it asks; every gpt-5 request with any `reasoning_effort`, even "
    "\"minimal\", is complex. These keep money on the table by design.",
    "- **Caveats of the money numbers.** Input tokens come from a BERT WordPiece tokenizer, "
    "not OpenAI's; the same output length is assumed for the routed model; images are priced "
    "at the same token count on every model (OpenAI bills gpt-4o-mini and gpt-4.1-mini/nano "
    "image inputs at a multiple of their text tokens; images are complex, so this matters "
    "only where a budget moves complex requests: wide at soft, any policy at hard); no "
    "prompt-cache discount. The shares of agents, kinds and models are this benchmark's "
    "assumptions: savings scale with the simple and standard shares of a real fleet, which "
    "`mode: dry_run` measures on real traffic.",
]


def reading(results: dict[str, Any]) -> list[str]:
    """The "Reading the numbers" section: sentences from the numbers, then fixed notes."""
    return [*_reading_speed(results), *_reading_money(results), *READING_STATIC]


def _reading_speed(results: dict[str, Any]) -> list[str]:
    t, s = results["timing"], results.get("sidecar")
    out = []
    p = {k: t[f"decide:{k}"] for k in POLICIES}
    failed = [k for k in ("conservative", "wide") if p[k]["p99"] >= TARGET_P99_US]
    short = t["wide_per_agent"].get(f"last user turn <= {SPLIT_CHARS:,} chars")
    long = t["wide_per_agent"].get(f"last user turn > {SPLIT_CHARS:,} chars")
    verdict = (f"**not met** by {' and '.join(failed)}" if failed else "**met** by both")
    out.append(
        f"- **Decision cost.** p50 / p99 {p['conservative']['p50']:.1f} / "
        f"{p['conservative']['p99']:.1f} {US} with the conservative preset and "
        f"{p['wide']['p50']:.1f} / {p['wide']['p99']:.1f} {US} with the wide policy, against "
        f"{p['none']['p50']:.2f} / {p['none']['p99']:.2f} {US} with no policy; "
        f"`features_of` alone is {t['features_of']['p50']:.1f} / {t['features_of']['p99']:.1f}"
        f" {US} of it, and parsing the body (done anyway) {t['parse_request']['p50']:.1f} / "
        f"{t['parse_request']['p99']:.1f} {US}. The target p99 < {TARGET_P99_US:.0f} {US} over "
        f"this workload is {verdict}. Tail percentiles move by tens of percent between runs "
        f"on this shared machine; the verdict is not close either way.")
    if short and long:
        parts = t.get("feature_parts") or {}
        words = parts.get("cue and math words (_words)")
        what_if = parts.get("what-if: _words on the last 2,000 chars only")
        line = (f"  Split by the last user turn: up to {SPLIT_CHARS:,} chars p50 / p99 "
                f"{short['p50']:.1f} / {short['p99']:.1f} {US} "
                f"({'within' if short['p99'] < TARGET_P99_US else 'over'} the target), over "
                f"{SPLIT_CHARS:,} chars (the RAG contexts) {long['p50']:.1f} / {long['p99']:.1f}"
                f" {US}: the cost grows with the scanned text (up to 8,000 chars), so the "
                f"workload's p99 is set by its long prompts.")
        if words and what_if:
            line += (f" On those, the word-cue scan alone takes {words['p50']:.0f} {US} at "
                     f"p50; over the last {SPLIT_CHARS:,} chars only it would take "
                     f"{what_if['p50']:.0f} {US}.")
        out.append(line)
    if s is not None:
        d = {k: s[k]["overhead_ms"] for k in SIDECARS}
        extra = {k: (d[k]["p50"] - d["none"]["p50"]) * 1000 for k in ("conservative", "wide")}
        extra99 = {k: (d[k]["p99"] - d["none"]["p99"]) * 1000 for k in ("conservative", "wide")}
        kept, moved = s["wide"]["overhead_kept_ms"], s["wide"]["overhead_rewritten_ms"]
        line = (
            f"- **Through a sidecar.** `x-sidecar-overhead-ms` p50 {d['none']['p50']:.3f} ms with "
            f"no policy, {d['conservative']['p50']:.3f} ms conservative, {d['wide']['p50']:.3f}"
            f" ms wide: routing adds {extra['conservative']:.0f} / {extra['wide']:.0f} {US} at "
            f"p50 and {extra99['conservative']:.0f} / {extra99['wide']:.0f} {US} at p99 per "
            f"request. That is more than the decision timed in a tight loop "
            f"({p['conservative']['p50']:.0f} {US} at p50), plausibly because inside a server "
            f"the decision runs with colder CPU caches; the p99 step matches the long-prompt "
            f"decisions above.")
        if kept.get("n") and moved.get("n"):
            line += (f" Rewriting the body is a small part: with the wide policy, requests it "
                     f"rewrote show p50 {moved['p50']:.3f} ms, requests it kept "
                     f"{kept['p50']:.3f} ms.")
        line += (" Against an upstream that answers in hundreds of milliseconds, a tenth of a "
                 "millisecond is well under 0.1% of a request.")
        out.append(line)
    return out


def _reading_money(results: dict[str, Any]) -> list[str]:
    m, b, n = results["money"], results["breakdown"], results["requests"]
    pol = m["policies"]
    spend = b["tier_spend"]
    total = sum(spend.values())
    large = {k: b["policies"][k]["per_need"].get("large", (0, 0, 0.0)) for k in
             ("conservative", "wide")}
    out = [
        f"- **Money.** Conservative saves {_pct(pol['conservative']['ok']['savings'])} and "
        f"rewrites {_pct(pol['conservative']['ok']['rewritten'] / n)} of requests; wide saves "
        f"{_pct(pol['wide']['ok']['savings'])} and rewrites "
        f"{_pct(pol['wide']['ok']['rewritten'] / n)}. The simple tier is "
        f"{_pct(b['tiers'].get('simple', 0) / n)} of requests but only "
        f"{_pct(spend.get('simple', 0.0) / total)} of the spend (short prompts, short answers), "
        f"so moving all of it cannot save much; the complex tier "
        f"({_pct(b['tiers'].get('complex', 0) / n)} of requests) carries "
        f"{_pct(spend.get('complex', 0.0) / total)} of the spend and neither policy touches it.",
        f"- **Risk in numbers.** Of the requests the author judged to need the requested "
        f"model, conservative moved {large['conservative'][0]:,} of {large['conservative'][1]:,}"
        f" and wide {large['wide'][0]:,}: the classifier's *simple* is \"short and plain\", "
        f"not \"easy\" (examples above).",
        f"- **Budgets.** At the soft level the tier drops by one, which turns the wide policy "
        f"into one that moves complex requests too (code, images, schemas, long contexts): "
        f"{pol['wide']['soft']['rewritten']:,} moved, {_pct(pol['wide']['soft']['savings'])} "
        f"saved, at a quality risk far above the ok level. Conservative at soft moves the "
        f"standard tier to the family's mini ({pol['conservative']['soft']['rewritten']:,} "
        f"moved, {_pct(pol['conservative']['soft']['savings'])} saved). At the hard level with "
        f"`on_hard: cheapest`, requests for a model no policy covers (here every gpt-4o-mini "
        f"request, {pol['conservative']['hard']['denied']:,}) are denied even though they "
        f"already ask for a cheap model, and with no policy at all every request is denied.",
    ]
    return out


def report(results: dict[str, Any], reqs: Sequence[Req]) -> str:
    """The markdown report."""
    mach = results["machine"]
    n = results["requests"]
    lines = [
        "# Cost-aware routing: decision cost, sidecar overhead, and savings vs. risk", "",
        f"Command: `{results['command']}`  ",
        f"Date: {DATE} (run started {results['started']}); {results['duration_s']:.0f} s  ",
        f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), shared and noisy; Python "
        f"{mach['python']}, kernel {mach['kernel']}, aiohttp {mach['aiohttp']}; load average "
        f"at start {', '.join(f'{x:.2f}' for x in mach['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in results['loadavg_end'])}  ",
        f"Revision: {mach['revision']} (read from .git; the tree may carry uncommitted "
        f"changes of other work in progress)", "",
        "Everything is measured in one process and one run: the in-process timings, three "
        "sidecars against the mock upstream, and the policy decisions that price the "
        f"workload. {n:,} requests; seed {results['seed']}.", "",
    ]
    lines += _decision_section(results["timing"], results["quick"])
    if results.get("sidecar") is not None:
        lines += _sidecar_section(results["sidecar"])
    lines += _workload_section(results, reqs, results["tokens"])
    lines += _money_section(results["money"], results["breakdown"], n)
    lines += _tier_section(results["breakdown"])
    lines += _risk_section(results["breakdown"], results["examples"])
    lines += _budget_section(results["money"], n)
    lines += ["## Reading the numbers", "", *reading(results), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def prepare(n: int, seed: int) -> tuple[list[Req], list[CanonicalRequest], dict[str, Any]]:
    """Build, encode, parse, classify and count the workload."""
    reqs = Workload(n, seed).build()
    classifier = Classifier(load_default_rules())
    canon: list[CanonicalRequest] = []
    for r in reqs:
        r.raw = orjson.dumps(r.body)
        c = parse_request(Endpoint.CHAT, r.raw)
        canon.append(c)
        f = features_of(Endpoint.CHAT, c.body)
        r.est_tokens = f.est_input_tokens
        r.tier, r.rule = classifier.classify(f)
    return reqs, canon, count_tokens(reqs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three parts and write the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REQUESTS} requests, {QUICK_TIMED:,} timed decisions per "
                             f"cell, {QUICK_SIDECAR} requests per sidecar")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-sidecar", action="store_true", help="skip part 2")
    parser.add_argument("--out", type=Path, default=HERE / "REPORT-routing.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers")
    args = parser.parse_args(argv)
    n = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS)
    timed = QUICK_TIMED if args.quick else TIMED
    shown = sys.argv[1:] if argv is None else list(argv)
    command = ".venv/bin/python -m loadtest.bench_routing" + "".join(" " + a for a in shown)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    mach = machine()
    t0 = time.perf_counter()
    reqs, canon, tokens = prepare(n, args.seed)
    catalog = build_catalog({})
    routers = make_routers(catalog)
    print(f"workload: {n} requests, tiers {Counter(r.tier for r in reqs)}", flush=True)
    timing = time_decisions(reqs, canon, routers, timed)
    timing["feature_parts"] = time_feature_parts(reqs, canon, 3 if args.quick else 10)
    print("p50/p99 us: " + ", ".join(f"{k} {v['p50']:.1f}/{v['p99']:.1f}"
                                     for k, v in timing.items()
                                     if isinstance(v, dict) and "p99" in v), flush=True)
    # Decisions are made on fresh parses: decide() never mutates the body, but be safe.
    decisions = decide_all(reqs, canon, routers)
    sidecar = None
    if not args.no_sidecar:
        count = QUICK_SIDECAR if args.quick else min(SIDECAR_REQUESTS, n)
        expected = {name: decisions[name]["ok"] for name in SIDECARS}
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            sidecar = runner.run(through_sidecars(reqs[:count], expected))
        print("sidecar overhead p50 ms: " + ", ".join(
            f"{k} {sidecar[k]['overhead_ms']['p50']:.3f}" for k in SIDECARS), flush=True)
    m = money(reqs, decisions, catalog)
    b = breakdown(reqs, decisions, catalog)
    results: dict[str, Any] = {
        "command": command, "started": started, "machine": mach, "quick": args.quick,
        "seed": args.seed, "requests": n, "timing": timing, "sidecar": sidecar,
        "tokens": tokens, "money": m, "breakdown": b,
        "examples": examples(reqs, decisions, args.seed)}
    results["duration_s"] = time.perf_counter() - t0
    results["loadavg_end"] = os.getloadavg()
    args.out.write_text(report(results, reqs), "utf-8")
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2
                                           | orjson.OPT_NON_STR_KEYS))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""), flush=True)
    for name, doc in m["policies"].items():
        print(f"{name}: {_usd(doc['ok']['cost_usd'])} ({_pct(doc['ok']['savings'])} saved)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
