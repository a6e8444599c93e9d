"""Response cache on a synthetic agent workload: hit rate per tier, wrong hits, dollars saved.

Run: ``.venv/bin/python -m loadtest.bench_workload`` (writes ``loadtest/REPORT-workload.md``
and ``loadtest/results/workload.json``; ``--quick`` for 600 requests, ``--requests N``,
``--seed S``). Needs no network, no Redis: an in-process sidecar with its local cache in front
of the in-process mock upstream (``loadtest/mock_upstream.py``).

The workload. Four agent types share one sidecar (one tenant), each with its own long system
prompt and tool list, every request ``temperature: 0`` on ``gpt-4o-mini``. Two of them stamp
every new request's system prompt with the current time and a request or conversation id (as
many agent frameworks do); two have a static prompt. A seeded stream of N requests mixes:

- ``exact`` (30%): an earlier request re-sent byte for byte (retries, re-runs, several agents
  reaching the same step); which one is skewed by popularity (Pareto weights, a heavy tail)
  and, for a third of them, recency (a retry of one of the last ten requests);
- ``normalized`` (10%): an earlier request asked again with a new time/id stamp (stamped
  agents) or with its user text differing in case, whitespace or trailing punctuation;
- ``paraphrase`` (8%): the ``b`` of a ``loadtest/data/paraphrases.jsonl`` pair whose ``a`` was
  sent earlier by the same agent in the same step;
- ``near_miss`` (10%): the ``b`` of a ``loadtest/data/hard_negatives.jsonl`` pair whose ``a``
  was sent earlier in the same way; it means something else and must not hit (at 3,000
  requests every one of the 300 pairs is used once);
- ``unique`` (42%): first-time prompts, from per-agent templates and the ``a`` sides above.

Every request carries a ground-truth meaning id (shared by repeats, variants and paraphrases
of one question). The mock's answer is a deterministic function of the messages, so each
upstream answer identifies the request it was made for; a hit serving an answer made for
another meaning is a *wrong hit*. The stream runs sequentially, each answer settled (stored)
before the next request, through a fresh sidecar per configuration.

Money. Input tokens are estimated as the request body's bytes / 4, output tokens are the
served answer's ``usage.completion_tokens`` (the mock writes as many words as the agent's
``x-mock-tokens``); priced at public OpenAI list prices (``PRICES``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest.bench import machine_info
from loadtest.mock_upstream import MockConfig, MockUpstream
from proxy.app import PIPELINE, build_app
from proxy.cache.embedder import StaticEmbedder
from proxy.cache.guard import Guard
from proxy.cache.normalize import Normalizer
from proxy.cache.stage import CacheStage
from proxy.config import CacheConfig, SidecarConfig, UpstreamConfig
from proxy.server import running

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
CHAT_ROUTE = "POST /v1/chat/completions"
MODEL = "gpt-4o-mini"
API_KEY = "sk-agent-fleet"

CATEGORIES = ("exact", "normalized", "paraphrase", "near_miss", "unique")
# near_miss is 10%, not the 5% first planned: at 3,000 requests that sends every one of the
# 300 hard-negative pairs once, so the wrong-hit count covers the whole set.
SHARES = {"exact": 0.30, "normalized": 0.10, "paraphrase": 0.08, "near_miss": 0.10,
          "unique": 0.42}
ACT_SHARE = 0.30          # steps that let the model call a tool (tool_choice auto)
RETRY_SHARE = 1 / 3       # exact repeats that re-send one of the last RETRY_WINDOW requests
RETRY_WINDOW = 10
PARETO_ALPHA = 1.1        # popularity of a request: heavy-tailed, Zipf-like
SECONDS_PER_REQUEST = 1.2  # simulated clock: 3,000 requests ~ one hour of fleet traffic

# USD per 1M tokens: (input, output, cached input). OpenAI API pricing page, 2025
# (unchanged from the gpt-4o-mini launch in July 2024 and the gpt-4o price cut of August 2024).
PRICES: dict[str, tuple[float, float, float]] = {
    "gpt-4o-mini": (0.15, 0.60, 0.075),
    "gpt-4o": (2.50, 10.00, 1.25),
}
PRICES_AS_OF = "OpenAI API list prices as published in 2025"


# ---------------------------------------------------------------- agents


def _tool(name: str, description: str, **params: str) -> dict[str, Any]:
    props = {k: {"type": "integer" if v == "int" else "string", "description": k.replace("_", " ")}
             for k, v in params.items()}
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": props, "required": list(params)[:1],
                       "additionalProperties": False}}}


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent type: its prompt, tools, answer length, stamp and question templates."""

    name: str
    share: float
    stamp: str | None  # "iso_uuid" or "utc_req": a fresh time + id per request; None: static
    system: str
    tools: tuple[dict[str, Any], ...]
    completion_tokens: int
    templates: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]
    few_shot: tuple[dict[str, str], ...] = ()


_SUPPORT_SYSTEM = """You are Nova, the customer support agent of Northwind Cloud, a \
subscription service for file storage, team workspaces and online invoicing used by small and \
medium businesses in Europe and North America. You answer customers in the chat widget and by \
email, and you act on their account through the tools listed below.

Goals, in order: resolve the customer's problem in as few turns as possible; never take an \
action on an account that the customer did not ask for; keep the customer informed of what you \
did and what happens next; escalate to a human when policy says so.

Policies:
- Identify the account before any account action. A verified chat session counts as \
identified; an email thread counts only if it comes from the account's primary address.
- Refunds: duplicate charges are refunded in full without approval. Other refunds up to 50 EUR \
may be granted once per customer per year; anything above needs a human agent (create a \
ticket with the category billing_escalation).
- Orders of physical hardware (the Northwind Box) can be returned within 30 days if unused, \
14 days if opened. Shipping costs are not refunded unless the item arrived damaged.
- Never reveal another customer's data, internal ticket notes, or the names of staff members.
- Never promise delivery dates; quote the carrier's estimate and say it is an estimate.
- Plans: Starter, Team, Business and Enterprise. Feature availability per plan is in the \
knowledge base; search it rather than answering from memory, because it changes often.
- Security questions (password resets, two-factor authentication, single sign-on, API keys): \
give the self-service steps first; a reset performed by you requires the customer to confirm \
the last four digits of the card on file.
- Outages: if several customers report the same symptom, check the status page tool before \
troubleshooting; if there is an open incident, link it and do not troubleshoot further.
- Tone: friendly, concise, no jargon, no exclamation marks, no emojis. Use the customer's \
language (English, German, French, Spanish or Dutch). Address the customer by first name if \
known.
- Formatting: short paragraphs; numbered steps for procedures; never more than eight steps; \
links as plain URLs on their own line.
- If you are unsure, say what you will check and check it with a tool instead of guessing.
- Close every conversation by asking whether anything else is needed, unless the customer \
said goodbye.

Tools: lookup_order finds an order and its shipments; lookup_account returns plan, seats and \
billing status; search_kb searches the knowledge base; create_ticket hands the case to a \
human team; issue_refund refunds a charge within policy; status_page lists open incidents. \
Call at most one tool per turn, and explain to the customer why you are calling it."""

_CODING_SYSTEM = """You are a senior software engineer working as a coding agent inside the \
company's monorepo. The repository holds Python 3.12 services (FastAPI, SQLAlchemy 2, \
pytest), a TypeScript front end (React 18, Vite, Vitest), a few Go command line tools and Rust \
libraries for the hot paths. You receive tasks from engineers in the team chat and in pull \
request comments, and you work through the tools below: read files, search the code, run \
commands in a sandbox, and propose patches.

How you work:
- Read before you write. Look at the surrounding code, its tests and its callers before \
proposing a change, and follow the conventions you find: naming, error handling, logging, \
typing, docstrings.
- Keep changes minimal and focused on the task. Do not reformat unrelated code, do not rename \
things in passing, do not upgrade dependencies unless asked.
- Every behaviour change comes with a test. Prefer a failing test first, then the fix. Tests \
must be deterministic: no sleeps, no network, no wall-clock time, no random seeds left open.
- Type everything. Python code must pass mypy in strict mode and ruff with the repository's \
configuration; TypeScript must pass tsc with strict enabled and eslint.
- Errors are values at module boundaries: raise specific exceptions inside a module, convert \
them to the service's error type at its edge, never swallow an exception silently, never log \
and re-raise the same error twice.
- Security: never print secrets, never disable TLS verification, parameterise every SQL \
statement, validate every input that crosses a trust boundary, and treat file paths from users \
as untrusted.
- Performance: measure before optimising; when you claim a speed-up, show the benchmark and \
the numbers before and after. Avoid quadratic loops over request data.
- Concurrency: the services are asyncio based; never block the event loop with file or network \
I/O, use the provided async clients, and protect shared state with the existing locks.
- Documentation: update the docstring and the module README when behaviour changes; keep \
comments about why, not what.
- Git: one logical change per commit, imperative subject line under 72 characters, a body that \
explains the reason. Never force-push shared branches. Never commit generated files.
- When a request is ambiguous, state your assumption explicitly and proceed with the most \
conservative interpretation; when it is dangerous (data deletion, migrations on production \
tables), stop and ask.

Answer format: first a one-paragraph summary of what you found or changed, then the patch or \
the code in fenced blocks with the language tag, then how you verified it (commands and their \
output, abbreviated), then open questions if any. Keep explanations short; engineers read the \
code.

Tools: read_file returns a file's content with line numbers; search_code greps the repository \
with a regular expression; run_command runs a shell command in the sandbox (no network) and \
returns its output and exit code; propose_patch submits a unified diff for review; \
open_pull_request opens a pull request from a proposed patch. Prefer search_code over guessing \
file locations, and run the tests you touched with run_command before proposing a patch."""

_ANALYST_SYSTEM = """You are an analytics assistant for the revenue operations team. You \
answer questions about sales, revenue, churn, product usage and customer surveys using the \
company's data warehouse (tables: orders, order_items, customers, subscriptions, invoices, \
product_events, survey_responses; all timestamps in UTC; amounts in EUR cents).

Rules:
- When a number is asked for, query it with run_sql rather than estimating; show the SQL you \
ran in a collapsed block after the answer.
- State the time window, the filters and the definition of every metric you report (for \
example: churn is the share of subscriptions active on the first day of the period that were \
cancelled before its last day; revenue is recognised revenue, not bookings).
- Round percentages to one decimal and money to whole euros; use thousands separators.
- Compare against the previous period and the same period last year when it helps; flag \
anomalies larger than two standard deviations of the trailing twelve weeks.
- Never expose personal data of individual customers; aggregate to at least 20 customers per \
group, otherwise say the group is too small to report.
- Charts: when a trend is asked for, call make_chart with a line chart; for comparisons between \
groups, a bar chart; always label axes and units.
- Write for executives: lead with the answer in one sentence, then at most five bullet points \
of supporting detail, then caveats.
- If the data needed is not in the warehouse, say so and suggest who might have it instead of \
inventing numbers.

Tools: run_sql runs a read-only query on the warehouse and returns at most 500 rows; \
make_chart renders a chart from rows; describe_table lists a table's columns and their \
meaning; search_dashboards finds existing dashboards that may already answer the question."""

_OPS_SYSTEM = """You are the on-call assistant of the platform team. You help engineers \
investigate alerts, read logs and metrics, and carry out routine operations on the production \
and staging Kubernetes clusters (eu-prod-1, eu-prod-2, us-prod-1, staging) through the tools \
below.

Operating rules:
- Read-only first: before any change, look at the relevant dashboards, recent deploys and logs, \
and say what you see.
- Changes to production (restarts, scaling, rollbacks, config changes) need an explicit \
confirmation from the engineer in the same conversation; repeat the exact action, target \
cluster and namespace before asking for it. Staging changes need no confirmation.
- Never delete persistent volumes, databases, namespaces or secrets; never change IAM or \
network policies; escalate such requests to a human with page_oncall.
- Prefer rollbacks over hot fixes during an incident; prefer scaling out over scaling up.
- During business hours (08:00-18:00 in the cluster's region) restarts must be rolling and \
respect pod disruption budgets.
- Quote timestamps in UTC and durations in minutes. When you cite a metric, give its name, the \
window and the aggregation (for example p99 of http_request_duration_seconds over 15 minutes).
- Keep a running incident log: every action you take is summarised in one line at the end of \
your answer, with the time it was taken.
- If an alert looks like a false positive, say why and propose a change to its threshold \
instead of silencing it.
- Be brief: engineers are usually in the middle of an incident.

Tools: query_metrics runs a PromQL query; get_logs fetches log lines for a service, cluster \
and time window; list_deploys returns the recent deploys of a service; kubectl_action performs \
a restart, scale or rollback; page_oncall pages the human on call with a summary."""

_COMPLAINTS = (
    "their delivery arrived a week late", "the package arrived damaged",
    "they were charged after cancelling", "the app deleted their shared folder",
    "support did not answer for three days", "the invoice shows the wrong company name",
    "their discount code was rejected", "the mobile app crashes on login",
    "the upload limit was lowered without notice", "their teammate lost access to a workspace",
    "the price went up at renewal", "the sync client duplicated all their files",
    "the export only contained half of their data", "the password reset email never came",
    "they cannot downgrade from Business to Team online",
)

AGENTS: tuple[Agent, ...] = (
    Agent(
        name="support", share=0.35, stamp="iso_uuid", system=_SUPPORT_SYSTEM,
        completion_tokens=220,
        tools=(
            _tool("lookup_order", "Find an order and its shipments.", order_id="str"),
            _tool("lookup_account", "Plan, seats and billing status of an account.",
                  account_email="str"),
            _tool("search_kb", "Search the knowledge base.", query="str", language="str"),
            _tool("create_ticket", "Hand the case to a human team.", summary="str",
                  category="str", priority="str"),
            _tool("issue_refund", "Refund a charge within policy.", charge_id="str",
                  amount_cents="int", reason="str"),
            _tool("status_page", "List open incidents.", component="str"),
        ),
        templates=(
            "Where is my order {order}? The tracking page has not changed since {weekday}.",
            "I was charged twice for invoice {invoice}. Can you refund the duplicate charge?",
            "How do I {account_action} on my Northwind account?",
            "Does the {plan} plan include {feature}?",
            "My {plan} plan shows {gb} GB used of {gb2} GB. What happens if I go over the limit?",
            "Please change the delivery address for order {order} to {street}.",
            "The customer {first} {last} says the mobile app logs them out every {minutes} "
            "minutes. What should I check?",
            "Can I return a {product} bought on {month} {day} if the box has been opened?",
            "Write a polite reply to a customer who is upset that {complaint}.",
            "What is the status of support ticket #{ticket}?",
        ),
        slots={
            "account_action": (
                "reset my password", "change the email address", "enable two-factor "
                "authentication", "download all my invoices", "add a teammate",
                "remove a teammate", "change my billing currency", "export my contacts",
                "delete my account", "update my payment card", "switch to annual billing",
                "rename my workspace", "turn off marketing emails", "recover a deleted project",
                "transfer ownership of a workspace", "change my time zone",
                "set up single sign-on", "generate an API key", "revoke an API key",
                "see my login history"),
            "plan": ("Starter", "Team", "Business", "Enterprise"),
            "feature": (
                "single sign-on", "audit logs", "priority support", "custom domains",
                "unlimited version history", "a dedicated account manager", "API access",
                "data residency in the EU", "shared team folders", "e-invoicing",
                "phone support", "guest accounts", "legal hold", "SCIM provisioning",
                "a 99.9% uptime SLA"),
            "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"),
            "first": ("Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Greta", "Hugo",
                      "Ines", "Jonas", "Karim", "Lena", "Marco", "Nadia", "Olivier"),
            "last": ("Schmidt", "Dubois", "Garcia", "Jansen", "Rossi", "Novak", "Larsen",
                     "Moreau", "Fischer", "Silva", "Kowalski", "Berg"),
            "product": ("Northwind Box", "Northwind Box Mini", "USB backup drive",
                        "card reader", "wireless receipt printer"),
            "month": ("January", "February", "March", "April", "May", "June", "July",
                      "August", "September", "October", "November", "December"),
            "complaint": _COMPLAINTS,
        },
    ),
    Agent(
        name="coding", share=0.25, stamp=None, system=_CODING_SYSTEM, completion_tokens=400,
        tools=(
            _tool("read_file", "Read a file with line numbers.", path="str"),
            _tool("search_code", "Grep the repository.", pattern="str", path_glob="str"),
            _tool("run_command", "Run a shell command in the sandbox.", command="str",
                  timeout_s="int"),
            _tool("propose_patch", "Submit a unified diff for review.", diff="str",
                  summary="str"),
            _tool("open_pull_request", "Open a pull request from a patch.", title="str",
                  body="str"),
        ),
        templates=(
            "Write a {lang} function that {task}.",
            "Why does `{func}()` raise `{exc}` when the input list is empty?",
            "Refactor `{module}.py` so that `{func}` no longer uses global state.",
            "Add a unit test for `{func}` that covers {case}.",
            "What does the error \"{err}\" mean when I run {tool}?",
            "Explain the difference between {concepts} in {lang}.",
            "How do I {git_task} with git?",
            "Bump {package} from {v1} to {v2} in requirements.txt and list the breaking "
            "changes.",
        ),
        slots={
            "lang": ("Python", "Go", "Rust", "TypeScript", "Java"),
            "task": (
                "parses an ISO 8601 date", "reverses a linked list",
                "removes duplicates from a list while keeping the order",
                "computes the SHA-256 of a file", "merges two sorted arrays",
                "validates an email address", "retries a call with exponential backoff",
                "flattens a nested dictionary", "reads a CSV file into records",
                "converts a Roman numeral to an integer", "checks whether a string is a palindrome",
                "finds the longest common prefix of some strings", "rate limits calls per second",
                "chunks a list into pages", "pretty prints a JSON document",
                "computes the Levenshtein distance", "walks a directory tree",
                "memoizes an expensive function", "counts word frequencies in a text",
                "serialises a binary tree"),
            "func": ("parse_config", "load_users", "merge_invoices", "resolve_path",
                     "compute_totals", "fetch_prices", "normalize_email", "build_index",
                     "render_template", "schedule_jobs", "apply_discount", "read_manifest",
                     "split_batches", "validate_order", "hash_password", "export_report"),
            "exc": ("ValueError", "KeyError", "IndexError", "TypeError", "ZeroDivisionError",
                    "StopIteration", "AttributeError"),
            "module": ("billing", "accounts", "search", "exports", "scheduler", "pricing",
                       "ingest", "notifications"),
            "case": ("an empty input", "unicode input", "a duplicate key",
                     "a timeout from the database", "a negative amount", "a missing file",
                     "a very large batch", "concurrent calls", "a malformed date",
                     "a null customer id", "a leap day", "a retry after failure"),
            "err": ("ModuleNotFoundError: No module named 'app'",
                    "error: externally-managed-environment", "ENOSPC: no space left on device",
                    "Incompatible types in assignment", "borrowed value does not live long enough",
                    "cannot find module 'react' or its corresponding type declarations",
                    "fatal: refusing to merge unrelated histories",
                    "SSL: CERTIFICATE_VERIFY_FAILED", "RecursionError: maximum recursion depth "
                    "exceeded", "ImportError: cannot import name 'Self' from 'typing'",
                    "exec format error", "permission denied while trying to connect to the "
                    "Docker daemon socket"),
            "tool": ("pytest", "mypy", "npm install", "cargo build", "docker build",
                     "pip install"),
            "concepts": ("a list and a tuple", "threads and processes", "async and sync code",
                         "an interface and an abstract class", "a mutex and a semaphore",
                         "shallow and deep copies", "a map and a slice",
                         "ownership and borrowing", "composition and inheritance",
                         "generics and overloading", "a stack and a queue",
                         "pass by value and pass by reference"),
            "git_task": ("undo the last commit but keep the changes", "squash the last three "
                         "commits", "rename a branch", "delete a remote branch",
                         "cherry-pick a commit from another branch", "find which commit "
                         "introduced a bug", "stash only some files", "change the author of a "
                         "commit", "recover a deleted branch", "split a commit in two",
                         "ignore a file that is already tracked", "rebase onto main"),
            "package": ("requests", "sqlalchemy", "fastapi", "pydantic", "numpy", "pandas",
                        "celery", "boto3", "redis", "httpx"),
        },
    ),
    Agent(
        name="analyst", share=0.20, stamp=None, system=_ANALYST_SYSTEM, completion_tokens=300,
        tools=(
            _tool("run_sql", "Run a read-only warehouse query.", sql="str"),
            _tool("make_chart", "Render a chart from rows.", kind="str", title="str"),
            _tool("describe_table", "Columns of a table and their meaning.", table="str"),
            _tool("search_dashboards", "Find existing dashboards.", query="str"),
        ),
        templates=(
            "Summarize the Q{q} {year} revenue trend for the {region} region.",
            "Compare customer churn between the {segment} and {segment2} segments in {month}.",
            "Which {k} products had the largest drop in weekly sales in {region} last {period}?",
            "Draft a one-paragraph executive summary of the {survey} survey results.",
            "What is the median {metric} for customers who signed up in {month} {year}?",
            "Write a SQL query that returns {metric} by {dimension} for {year}.",
            "Explain why {metric} fell {pct}% week over week in {region}.",
            "Forecast {metric} for the next {k} quarters using a simple linear trend.",
        ),
        slots={
            "region": ("EMEA", "DACH", "Nordics", "Benelux", "Iberia", "North America", "LATAM",
                       "APAC", "UK and Ireland", "France"),
            "segment": ("self-serve", "SMB", "mid-market", "enterprise", "education",
                        "non-profit"),
            "segment2": ("self-serve", "SMB", "mid-market", "enterprise", "education",
                         "non-profit"),
            "month": ("January", "February", "March", "April", "May", "June", "July",
                      "August", "September", "October", "November", "December"),
            "period": ("week", "month", "quarter"),
            "survey": ("NPS", "onboarding", "pricing", "churned-customer", "admin console",
                       "mobile app", "support satisfaction", "feature request"),
            "metric": ("monthly recurring revenue", "average order value", "seats per account",
                       "time to first invoice", "net revenue retention", "support tickets per "
                       "account", "trial conversion rate", "gross margin", "refund rate",
                       "daily active users"),
            "dimension": ("plan", "country", "acquisition channel", "signup month",
                          "company size", "industry"),
        },
        few_shot=(
            {"role": "user", "content": "How many new subscriptions did we sign in the week "
             "before last?"},
            {"role": "assistant", "content": "We signed 1,284 new subscriptions in that week "
             "(Monday to Sunday, UTC), 6.2% more than the week before and 11.5% more than the "
             "same week last year.\n- Self-serve: 1,031\n- Sales-assisted: 253\nCaveat: "
             "subscriptions cancelled within 24 hours are excluded."},
        ),
    ),
    Agent(
        name="ops", share=0.20, stamp="utc_req", system=_OPS_SYSTEM, completion_tokens=150,
        tools=(
            _tool("query_metrics", "Run a PromQL query.", promql="str", window="str"),
            _tool("get_logs", "Fetch log lines.", service="str", cluster="str", minutes="int"),
            _tool("list_deploys", "Recent deploys of a service.", service="str"),
            _tool("kubectl_action", "Restart, scale or roll back.", action="str",
                  service="str", cluster="str"),
            _tool("page_oncall", "Page the human on call.", summary="str"),
        ),
        templates=(
            "Service {svc} p99 latency went from {ms} ms to {ms2} ms after deploy {ver}. What "
            "should I check first?",
            "Show me the error logs for {svc} in {cluster} over the last {minutes} minutes.",
            "Is it safe to restart the {svc} pods in {cluster} during business hours?",
            "Disk usage on {host} is at {pct}%. Which directories usually grow fastest on a "
            "{role} node?",
            "Write a runbook step for when the {alert} alert fires.",
            "Roll back {svc} to version {ver} in {cluster}.",
            "Why is the {job} cron job taking {minutes} minutes longer than usual?",
            "Scale {svc} to {k} replicas in {cluster} and tell me the expected cost change.",
        ),
        slots={
            "svc": ("checkout-api", "search-svc", "auth-gateway", "billing-worker",
                    "invoice-renderer", "sync-daemon", "notification-hub", "file-indexer",
                    "pricing-api", "webhook-relay"),
            "cluster": ("eu-prod-1", "eu-prod-2", "us-prod-1", "staging"),
            "role": ("Kafka broker", "Postgres replica", "build agent", "ingress",
                     "Elasticsearch data", "Redis"),
            "alert": ("HighErrorRate", "PodCrashLooping", "DiskAlmostFull", "CertExpiringSoon",
                      "KafkaConsumerLag", "ReplicationLagHigh", "NodeNotReady",
                      "ApdexBelowTarget", "QueueBacklogGrowing", "OOMKilledSpike"),
            "job": ("nightly-backup", "invoice-batch", "search-reindex", "gdpr-purge",
                    "usage-rollup", "cert-renewal"),
        },
    ),
)
AGENT_BY_NAME = {a.name: a for a in AGENTS}

# Slots drawn from the random generator rather than from a list.
_GENERATED: dict[str, Callable[[random.Random], str]] = {
    "order": lambda r: f"NW-{r.randrange(10_000, 100_000)}",
    "invoice": lambda r: f"INV-{r.randrange(2024, 2027)}-{r.randrange(1, 10_000):04d}",
    "ticket": lambda r: str(r.randrange(100_000, 1_000_000)),
    "gb": lambda r: str(r.choice((12, 48, 95, 180, 240, 480, 960))),
    "gb2": lambda r: str(r.choice((50, 100, 250, 500, 1000))),
    "street": lambda r: f"{r.randrange(1, 200)} {r.choice(('Harbour', 'Mill', 'Station', 'Park', 'Church', 'Market'))} {r.choice(('Street', 'Road', 'Lane'))}",  # noqa: E501
    "minutes": lambda r: str(r.choice((2, 5, 10, 15, 20, 30, 45, 60, 90))),
    "day": lambda r: str(r.randrange(1, 29)),
    "q": lambda r: str(r.randrange(1, 5)),
    "year": lambda r: str(r.randrange(2022, 2027)),
    "k": lambda r: str(r.choice((3, 4, 5, 6, 8, 10, 12, 20))),
    "pct": lambda r: str(r.randrange(5, 99)),
    "ms": lambda r: str(r.choice((80, 120, 150, 200, 250, 300))),
    "ms2": lambda r: str(r.choice((400, 650, 900, 1200, 1800, 2500))),
    "ver": lambda r: f"v{r.randrange(1, 5)}.{r.randrange(0, 30)}.{r.randrange(0, 10)}",
    "v1": lambda r: f"{r.randrange(1, 3)}.{r.randrange(0, 20)}.{r.randrange(0, 10)}",
    "v2": lambda r: f"{r.randrange(3, 5)}.{r.randrange(0, 20)}.{r.randrange(0, 10)}",
    "host": lambda r: f"{r.choice(('db', 'kafka', 'build', 'ingress', 'es', 'cache'))}-"
                      f"{r.randrange(1, 40):02d}.{r.choice(('eu1', 'eu2', 'us1'))}.internal",
}


# ---------------------------------------------------------------- workload


@dataclass(slots=True)
class Request:
    """One request of the stream, with its ground truth."""

    idx: int
    category: str
    agent: str
    step: str          # "answer" (tool_choice none) or "act" (tool_choice auto)
    meaning: int
    text: str          # the last user turn
    body: bytes
    source: int | None = None  # the earlier request repeated, varied, paraphrased or near-missed
    detail: str = ""           # variant kind, hard-negative kind, "retry"/"popular"


@dataclass(slots=True)
class _Fresh:
    """A first-time prompt waiting in the unique pool; seeds carry their pair's ``b``."""

    agent: str
    step: str
    text: str
    pair: str = ""  # "", "paraphrase" or "near_miss"
    b: str = ""
    kind: str = ""


def norm_key(text: str) -> str:
    """Case, whitespace and trailing punctuation removed: for de-duplicating generated text."""
    return re.sub(r"\s+", " ", text.casefold()).strip().rstrip(".!?;:, ")


# Code and quoted strings are left alone: there case and spacing can be the question
# ('Does the regex match "Hello"' is not 'Does the regex match "hello"').
_CODE_SPLIT = re.compile(r"(`[^`]*`|\"[^\"\n]*\"|(?<![\w'])'[^'\n]+'(?![\w']))")


def surface_variant(text: str, rng: random.Random) -> tuple[str, str]:
    """``text`` with its case, spacing or trailing punctuation changed (not in code or quotes)."""
    for _ in range(20):
        kinds = rng.sample(("case", "whitespace", "punctuation"), rng.choice((1, 1, 2)))
        parts = _CODE_SPLIT.split(text)
        for kind in kinds:
            if kind == "case":
                if rng.random() < 0.5:
                    parts = [p if i % 2 else p.lower() for i, p in enumerate(parts)]
                elif parts[0]:
                    first = parts[0][0]
                    parts[0] = (first.lower() if first.isupper() else first.upper()) + parts[0][1:]
            elif kind == "whitespace":
                choice = rng.randrange(3)
                if choice == 0:
                    prose = [i for i, p in enumerate(parts) if not i % 2 and " " in p]
                    if prose:
                        i = rng.choice(prose)
                        spaces = [m.start() for m in re.finditer(" ", parts[i])]
                        at = rng.choice(spaces)
                        parts[i] = parts[i][:at] + "  " + parts[i][at + 1:]
                elif choice == 1:
                    parts[-1] += rng.choice(("\n", " ", "\n\n"))
                else:
                    parts[0] = " " + parts[0]
            else:
                last = parts[-1]
                stripped = last.rstrip()
                if stripped.endswith(("?", ".")) and not stripped.endswith("..."):
                    parts[-1] = stripped[:-1] + last[len(stripped):]
                else:
                    parts[-1] = last + rng.choice(("?", "??", ".", " ?"))
        out = "".join(parts)
        if out != text:
            return out, "+".join(sorted(kinds))
    return text + "?", "punctuation"


class StreamBuilder:
    """Builds the seeded request stream (see the module docstring)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.clock = datetime(2026, 11, 25, 9, 0, 0, tzinfo=UTC)
        self.requests: list[Request] = []
        self.bodies: set[bytes] = set()
        self.distinct: list[int] = []       # requests whose body was new
        self.popularity: list[float] = []   # weight of each of ``distinct``
        self.meanings = 0
        self.pending: dict[str, list[tuple[int, _Fresh]]] = {"paraphrase": [], "near_miss": []}
        self.used: dict[str, set[str]] = {a.name: set() for a in AGENTS}

    # -- bodies

    def _stamp(self, agent: Agent) -> str:
        ts = self.clock.replace(microsecond=0)
        if agent.stamp == "iso_uuid":
            uid = "%08x-%04x-4%03x-%04x-%012x" % (  # noqa: UP031
                self.rng.getrandbits(32), self.rng.getrandbits(16), self.rng.getrandbits(12),
                0x8000 | self.rng.getrandbits(14), self.rng.getrandbits(48))
            return f"\n\nCurrent time: {ts:%Y-%m-%dT%H:%M:%S}Z\nConversation id: {uid}"
        rid = "req_" + "".join(self.rng.choices("0123456789abcdef", k=15)) + "7"
        return f"\n\nNow: {ts:%Y-%m-%d %H:%M:%S} UTC (request {rid})"

    def body(self, agent: Agent, step: str, text: str) -> bytes:
        """A fresh request body (a stamped agent's system prompt gets a new time and id)."""
        system = agent.system + (self._stamp(agent) if agent.stamp else "")
        messages = [{"role": "system", "content": system}, *agent.few_shot,
                    {"role": "user", "content": text}]
        return orjson.dumps({"model": MODEL, "temperature": 0, "messages": messages,
                             "tools": list(agent.tools),
                             "tool_choice": "auto" if step == "act" else "none"})

    # -- plan

    def _agent(self) -> Agent:
        return self.rng.choices(AGENTS, weights=[a.share for a in AGENTS])[0]

    def _step(self) -> str:
        return "act" if self.rng.random() < ACT_SHARE else "answer"

    def _claim(self, agent: str, *texts: str) -> bool:
        keys = {norm_key(t) for t in texts}
        if keys & self.used[agent]:
            return False
        self.used[agent] |= keys
        return True

    def _plant(self, a: str, b: str) -> str | None:
        """An agent (drawn by traffic share, others tried next) that has used neither text."""
        first = self._agent()
        others = [x for x in AGENTS if x is not first]
        self.rng.shuffle(others)
        for agent in (first, *others):
            if self._claim(agent.name, a, b):
                return agent.name
        return None

    def _seeds(self, n_para: int, n_near: int) -> list[_Fresh]:
        paraphrases = [orjson.loads(x) for x in (DATA / "paraphrases.jsonl").read_bytes()
                       .splitlines() if x]
        negatives = [orjson.loads(x) for x in (DATA / "hard_negatives.jsonl").read_bytes()
                     .splitlines() if x]
        self.rng.shuffle(paraphrases)
        self.rng.shuffle(negatives)
        seeds: list[_Fresh] = []
        for pair in negatives[:n_near]:
            agent = self._plant(pair["a"], pair["b"])
            if agent is not None:
                seeds.append(_Fresh(agent, self._step(), pair["a"], "near_miss", pair["b"],
                                    pair["kind"]))
        planted = 0
        for _round in range(len(AGENTS)):
            for pair in paraphrases:
                if planted >= n_para:
                    break
                agent = self._plant(pair["a"], pair["b"])
                if agent is not None:
                    seeds.append(_Fresh(agent, self._step(), pair["a"], "paraphrase",
                                        pair["b"]))
                    planted += 1
        return seeds

    def _templated(self, n: int) -> list[_Fresh]:
        out: list[_Fresh] = []
        formatter = string.Formatter()
        attempts = 0
        while len(out) < n and attempts < 200 * n + 1000:
            attempts += 1
            agent = self._agent()
            template = self.rng.choice(agent.templates)
            values: dict[str, str] = {}
            for _lit, name, _spec, _conv in formatter.parse(template):
                if name and name not in values:
                    gen = _GENERATED.get(name)
                    values[name] = gen(self.rng) if gen else self.rng.choice(agent.slots[name])
            if values.get("segment") is not None and values["segment"] == values.get("segment2"):
                continue
            text = template.format(**values)
            if self._claim(agent.name, text):
                out.append(_Fresh(agent.name, self._step(), text))
        return out

    # -- stream

    def build(self) -> list[Request]:
        """The whole stream, in order."""
        counts = {c: round(SHARES[c] * self.n) for c in CATEGORIES if c != "unique"}
        counts["unique"] = self.n - sum(counts.values())
        seeds = self._seeds(counts["paraphrase"], counts["near_miss"])
        templated = self._templated(max(0, counts["unique"] - len(seeds)))
        # Seeds early enough that their b can follow (first 60% of the unique draws).
        keyed = [(self.rng.uniform(0, 0.6), i, s) for i, s in enumerate(seeds)]
        keyed += [(self.rng.uniform(0, 1), len(seeds) + i, s) for i, s in enumerate(templated)]
        pool = [s for _k, _i, s in sorted(keyed, key=lambda x: (x[0], x[1]))]
        pool.reverse()  # pop() from the end
        remaining = dict(counts)
        for idx in range(self.n):
            feasible = [c for c in CATEGORIES if remaining[c] > 0 and self._can(c, pool)]
            if not feasible:  # para/near seeds exhausted: fall back to a repeat
                feasible = ["exact"] if self.requests else ["unique"]
            category = self.rng.choices(feasible,
                                        weights=[max(remaining[c], 1) for c in feasible])[0]
            remaining[category] -= 1
            self.clock += timedelta(seconds=self.rng.expovariate(1 / SECONDS_PER_REQUEST))
            self._emit(idx, category, pool)
        return self.requests

    def _can(self, category: str, pool: list[_Fresh]) -> bool:
        if category in ("exact", "normalized"):
            return bool(self.distinct)
        if category in self.pending:
            return bool(self.pending[category])
        return bool(pool)

    def _add(self, req: Request) -> None:
        self.requests.append(req)
        if req.body not in self.bodies:
            self.bodies.add(req.body)
            self.distinct.append(req.idx)
            self.popularity.append(self.rng.paretovariate(PARETO_ALPHA))

    def _pick_earlier(self) -> tuple[Request, str]:
        if self.rng.random() < RETRY_SHARE:
            return self.rng.choice(self.requests[-RETRY_WINDOW:]), "retry"
        i = self.rng.choices(self.distinct, weights=self.popularity)[0]
        return self.requests[i], "popular"

    def _emit(self, idx: int, category: str, pool: list[_Fresh]) -> None:
        if category == "exact":
            src, how = self._pick_earlier()
            self._add(Request(idx, category, src.agent, src.step, src.meaning, src.text,
                              src.body, src.idx, how))
        elif category == "normalized":
            self._add(self._variant(idx))
        elif category in self.pending:
            pending = self.pending[category]
            src_idx, seed = pending.pop(self.rng.randrange(len(pending)))
            src = self.requests[src_idx]
            agent = AGENT_BY_NAME[src.agent]
            meaning = src.meaning if category == "paraphrase" else self._new_meaning()
            self._add(Request(idx, category, src.agent, src.step, meaning, seed.b,
                              self.body(agent, src.step, seed.b), src.idx, seed.kind))
        else:
            fresh = pool.pop()
            agent = AGENT_BY_NAME[fresh.agent]
            req = Request(idx, "unique", fresh.agent, fresh.step, self._new_meaning(),
                          fresh.text, self.body(agent, fresh.step, fresh.text),
                          detail=fresh.pair)
            self._add(req)
            if fresh.pair:
                self.pending[fresh.pair].append((idx, fresh))

    def _variant(self, idx: int) -> Request:
        for _ in range(50):
            src, _how = self._pick_earlier()
            agent = AGENT_BY_NAME[src.agent]
            text, kind = src.text, "restamp"
            if agent.stamp is None or self.rng.random() < 0.3:
                text, surface = surface_variant(src.text, self.rng)
                kind = surface if agent.stamp is None else "restamp+" + surface
            body = self.body(agent, src.step, text)
            if body not in self.bodies:
                return Request(idx, "normalized", src.agent, src.step, src.meaning, text, body,
                               src.idx, kind)
        raise RuntimeError("no new normalized variant found")

    def _new_meaning(self) -> int:
        self.meanings += 1
        return self.meanings


# ---------------------------------------------------------------- running


@dataclass(slots=True)
class Outcome:
    """What the sidecar did with one request."""

    idx: int
    result: str            # "miss" or "hit"
    tier: str              # "", "exact", "normalized", "semantic"
    similarity: float | None
    correct: bool | None   # hits only
    served_for: int | None  # hits: the request whose upstream answer was served
    input_tokens: int
    output_tokens: int


@dataclass(slots=True)
class Run:
    """One configuration's pass over the stream."""

    name: str
    cache: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)
    upstream_calls: int = 0
    seconds: float = 0.0
    stage: dict[str, int] = field(default_factory=dict)
    settle_waits: int = 0  # times the answer of a miss was not yet queued for storing


def fingerprint(doc: dict[str, Any]) -> str:
    """What identifies the mock's answer: its text, or its tool call's id and arguments."""
    message = doc["choices"][0]["message"]
    if message.get("content"):
        return "text:" + str(message["content"])
    calls = message.get("tool_calls") or []
    return "tool:" + "|".join(f"{c['id']}:{c['function']['arguments']}" for c in calls)


def parse_cache_header(value: str) -> tuple[str, str, float | None]:
    """``x-sidecar-cache`` as (result, tier, similarity)."""
    parts = [p.strip() for p in value.split(";")]
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    sim = fields.get("similarity")
    return parts[0], fields.get("tier", ""), float(sim) if sim is not None else None


async def run_config(name: str, cache: CacheConfig, stream: Sequence[Request],
                     mock: MockUpstream, mock_url: str) -> Run:
    """Send the stream, in order, through a fresh sidecar with ``cache``."""
    cfg = SidecarConfig(upstream=UpstreamConfig(base_url=mock_url), cache=cache)
    app = build_app(cfg, env={"OTEL_SDK_DISABLED": "true"})
    pipeline = app[PIPELINE]
    stage = next(s for s in pipeline.stages if isinstance(s, CacheStage))
    run = Run(name, {k: v for k, v in asdict(cache).items() if k != "redis_url"})
    answers: dict[str, int] = {}  # fingerprint of an upstream answer -> request idx
    started = time.perf_counter()
    before = mock.stats.requests[CHAT_ROUTE]
    async with running(app, cfg, port=0) as base, aiohttp.ClientSession() as session:
        url = base + "/v1/chat/completions"
        for req in stream:
            agent = AGENT_BY_NAME[req.agent]
            headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                       "x-agent-id": req.agent, "x-mock-tokens": str(agent.completion_tokens)}
            stored_before = stage.stored + stage.not_stored
            async with session.post(url, data=req.body, headers=headers) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"request {req.idx}: HTTP {resp.status} {payload[:300]!r}")
                result, tier, sim = parse_cache_header(resp.headers.get("x-sidecar-cache", ""))
            doc = orjson.loads(payload)
            fp = fingerprint(doc)
            out_tokens = int(doc["usage"]["completion_tokens"])
            in_tokens = math.ceil(len(req.body) / 4)
            if result == "hit":
                served = answers.get(fp)
                correct = served is not None and stream[served].meaning == req.meaning
                run.outcomes.append(Outcome(req.idx, "hit", tier, sim, correct, served,
                                            in_tokens, out_tokens))
                continue
            prior = answers.setdefault(fp, req.idx)
            if stream[prior].meaning != req.meaning:
                raise RuntimeError(f"mock answer collision: {prior} and {req.idx}")
            run.outcomes.append(Outcome(req.idx, "miss", "", None, None, None, in_tokens,
                                        out_tokens))
            # The settle is queued just after the answer is written: wait until it is stored.
            for _ in range(1000):
                await pipeline.settler.join()
                if stage.stored + stage.not_stored > stored_before:
                    break
                run.settle_waits += 1
                await asyncio.sleep(0.001)
    run.seconds = time.perf_counter() - started
    run.upstream_calls = mock.stats.requests[CHAT_ROUTE] - before
    run.stage = {k: int(getattr(stage, k)) for k in ("stored", "not_stored", "refused",
                                                      "semantic_gone")}
    return run


# ---------------------------------------------------------------- analysis


def _cost(tokens_in: int, tokens_out: int, model: str, cached_input: bool = False) -> float:
    price_in, price_out, price_cached = PRICES[model]
    return (tokens_in * (price_cached if cached_input else price_in)
            + tokens_out * price_out) / 1e6


def analyse(run: Run, stream: Sequence[Request]) -> dict[str, Any]:
    """Hit rates per tier, per category, per agent; wrong hits; dollars."""
    n = len(run.outcomes)
    seen: set[int] = set()
    hittable = []
    for req in stream:  # could a correct answer have been cached? (its meaning came before)
        hittable.append(req.meaning in seen)
        seen.add(req.meaning)
    hits = [o for o in run.outcomes if o.result == "hit"]
    wrong = [o for o in hits if not o.correct]
    tiers = Counter(o.tier for o in hits)
    wrong_tiers = Counter(o.tier for o in wrong)
    by_cat: dict[str, dict[str, int]] = {}
    for o in run.outcomes:
        req = stream[o.idx]
        row = by_cat.setdefault(req.category, Counter())
        row["requests"] += 1
        row["hittable"] += hittable[o.idx]
        row[o.tier or "miss"] += 1
        row["wrong"] += o.result == "hit" and not o.correct
        row["correct"] += bool(o.correct)
    by_agent: dict[str, dict[str, int]] = {}
    for o in run.outcomes:
        req = stream[o.idx]
        row = by_agent.setdefault(req.agent, Counter())
        row["requests"] += 1
        row["hits"] += o.result == "hit"
        row["wrong"] += o.result == "hit" and not o.correct
        if o.tier:
            row[o.tier] += 1
        if req.category == "paraphrase":
            row["paraphrases"] += 1
            row["paraphrase_hits"] += o.result == "hit" and bool(o.correct)
    by_kind: dict[str, dict[str, int]] = {}
    for o in run.outcomes:
        req = stream[o.idx]
        if req.category == "near_miss":
            row = by_kind.setdefault(req.detail, Counter())
            row["requests"] += 1
            row["hits"] += o.result == "hit"
            row["wrong"] += o.result == "hit" and not o.correct
    money: dict[str, dict[str, float]] = {}
    for model in PRICES:
        total = sum(_cost(o.input_tokens, o.output_tokens, model) for o in run.outcomes)
        saved = sum(_cost(o.input_tokens, o.output_tokens, model) for o in hits)
        saved_ok = sum(_cost(o.input_tokens, o.output_tokens, model) for o in hits
                       if o.correct)
        saved_low = sum(_cost(o.input_tokens, o.output_tokens, model, True) for o in hits)
        money[model] = {"without_cache": total, "with_cache": total - saved, "saved": saved,
                        "saved_correct": saved_ok, "saved_per_1k": 1000 * saved / n,
                        "saved_cached_input_rate": saved_low,
                        "saved_share": saved / total if total else 0.0}
    sims = sorted(o.similarity for o in hits if o.similarity is not None)
    examples = []
    for o in wrong:
        req = stream[o.idx]
        src = stream[o.served_for] if o.served_for is not None else None
        examples.append({"idx": o.idx, "category": req.category, "agent": req.agent,
                         "tier": o.tier, "similarity": o.similarity, "text": req.text,
                         "served_for_idx": o.served_for,
                         "served_for_text": src.text if src else None,
                         "detail": req.detail})
    return {
        "requests": n, "upstream_calls": run.upstream_calls,
        "misses": n - len(hits), "hits": len(hits),
        "hit_rate": len(hits) / n if n else 0.0,
        "tiers": dict(tiers), "wrong_hits": len(wrong), "wrong_by_tier": dict(wrong_tiers),
        "wrong_distinct": len({(stream[o.idx].meaning, o.served_for) for o in wrong}),
        "wrong_share": len(wrong) / len(hits) if hits else 0.0,
        "hittable": sum(hittable),
        "recall": sum(bool(o.correct) for o in hits) / sum(hittable) if any(hittable) else 0.0,
        "by_category": {k: dict(v) for k, v in by_cat.items()},
        "by_agent": {k: dict(v) for k, v in by_agent.items()},
        "near_miss_by_kind": {k: dict(v) for k, v in by_kind.items()},
        "money": money, "semantic_similarities": sims, "wrong_examples": examples,
        "seconds": run.seconds, "stage": run.stage, "settle_waits": run.settle_waits,
        "tokens_per_hit": (sum(o.input_tokens + o.output_tokens for o in hits) / len(hits)
                           if hits else 0.0),
        "tokens_per_request": sum(o.input_tokens + o.output_tokens for o in run.outcomes) / n,
    }


def paraphrase_diagnosis(stream: Sequence[Request]) -> dict[str, Any]:
    """Offline: each paraphrase's cosine with its ``a`` and the guard's verdict."""
    embedder = StaticEmbedder.packaged()
    guard = Guard()
    rows = []
    for req in stream:
        if req.category != "paraphrase" or req.source is None:
            continue
        a = stream[req.source].text
        sim = float(embedder.embed(a) @ embedder.embed(req.text))
        reason = guard.refuses(guard.features(a), guard.features(req.text))
        rows.append({"idx": req.idx, "agent": req.agent,
                     "stamped": AGENT_BY_NAME[req.agent].stamp is not None,
                     "similarity": sim, "guard": reason or ""})
    return {"rows": rows}


def normalizer_merges() -> list[dict[str, str]]:
    """Hard-negative pairs (all 300) whose two prompts the normalized tier makes equal."""
    norm = Normalizer()
    out = []
    for line in (DATA / "hard_negatives.jsonl").read_bytes().splitlines():
        if line:
            pair = orjson.loads(line)
            if norm.normalize_text(pair["a"], False) == norm.normalize_text(pair["b"], False):
                out.append(pair)
    return out


def describe_stream(stream: Sequence[Request]) -> dict[str, Any]:
    """Counts of the generated stream, for the report."""
    cats = Counter(r.category for r in stream)
    agents = Counter(r.agent for r in stream)
    steps = Counter(r.step for r in stream)
    details = Counter(f"{r.category}:{r.detail}" for r in stream
                      if r.category in ("exact", "normalized") and r.detail)
    meanings = Counter(r.meaning for r in stream)
    sizes = [len(r.body) for r in stream]
    return {"categories": dict(cats), "agents": dict(agents), "steps": dict(steps),
            "details": dict(details), "meanings": len(meanings),
            "distinct_bodies": len({r.body for r in stream}),
            "top_meaning_requests": sorted(meanings.values(), reverse=True)[:10],
            "body_bytes_mean": sum(sizes) / len(sizes),
            "input_tokens_mean": sum(math.ceil(s / 4) for s in sizes) / len(sizes),
            "unique_from_pairs": Counter(r.detail for r in stream
                                         if r.category == "unique" and r.detail)}


# ---------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def _summary_table(results: dict[str, Any]) -> list[str]:
    lines = ["| config | requests | upstream calls | hits | hit rate | exact | normalized "
             "| semantic | wrong hits (distinct prompts) | wrong / hits | wrong by tier "
             "| recall of hittable |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in results["runs"].items():
        n = a["requests"]
        t = a["tiers"]
        lines.append(
            f"| {name} | {n:,} | {a['upstream_calls']:,} | {a['hits']:,} | "
            f"**{_pct(a['hit_rate'])}** | {t.get('exact', 0)} ({_pct(t.get('exact', 0) / n)}) "
            f"| {t.get('normalized', 0)} ({_pct(t.get('normalized', 0) / n)}) "
            f"| {t.get('semantic', 0)} ({_pct(t.get('semantic', 0) / n)}) "
            f"| **{a['wrong_hits']}** ({a['wrong_distinct']}) | {_pct(a['wrong_share'])} "
            f"| {_wrong_by_tier(a)} | {_pct(a['recall'])} |")
    return lines


def _wrong_by_tier(a: dict[str, Any]) -> str:
    parts = []
    for tier in ("exact", "normalized", "semantic"):
        hits = a["tiers"].get(tier, 0)
        if hits:
            wrong = a["wrong_by_tier"].get(tier, 0)
            parts.append(f"{tier} {wrong}/{hits} ({_pct(wrong / hits)})")
    return "; ".join(parts)


def _category_table(a: dict[str, Any]) -> list[str]:
    lines = ["| category | requests | hittable | miss | exact | normalized | semantic "
             "| wrong hits | correct hits / hittable |", "|---|---|---|---|---|---|---|---|---|"]
    for cat in CATEGORIES:
        row = a["by_category"].get(cat, {})
        h = row.get("hittable", 0)
        lines.append(f"| {cat} | {row.get('requests', 0)} | {h} | {row.get('miss', 0)} "
                     f"| {row.get('exact', 0)} | {row.get('normalized', 0)} "
                     f"| {row.get('semantic', 0)} | {row.get('wrong', 0)} "
                     f"| {_pct(row.get('correct', 0) / h) if h else 'n/a'} |")
    return lines


def _money_table(results: dict[str, Any]) -> list[str]:
    lines = ["| config | priced as | without cache | with cache | saved | saved % "
             "| saved / 1,000 requests | saved by correct hits | saved, input at cached rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, a in results["runs"].items():
        for model, m in a["money"].items():
            lines.append(f"| {name} | {model} | {_usd(m['without_cache'])} "
                         f"| {_usd(m['with_cache'])} | **{_usd(m['saved'])}** "
                         f"| {_pct(m['saved_share'])} | {_usd(m['saved_per_1k'])} "
                         f"| {_usd(m['saved_correct'])} | {_usd(m['saved_cached_input_rate'])} |")
    return lines


def _workload_section(w: dict[str, Any], n: int) -> list[str]:
    cats, agents = w["categories"], w["agents"]
    lines = [
        "## Workload", "",
        f"{n:,} requests, seed {w['seed']}; {w['meanings']:,} distinct meanings, "
        f"{w['distinct_bodies']:,} distinct request bodies. Mean body {w['body_bytes_mean']:,.0f} "
        f"bytes (~{w['input_tokens_mean']:,.0f} input tokens at 4 bytes a token: system prompt, "
        "tool definitions, question). Simulated clock: one request every "
        f"{SECONDS_PER_REQUEST} s on average, so the stream is about "
        f"{n * SECONDS_PER_REQUEST / 3600:.1f} h of fleet traffic; the cache's 1 h default TTL "
        "is not exercised (the run itself takes seconds).", "",
        "| agent | share | system prompt | tools | answer tokens | stamp in system prompt "
        "| requests |", "|---|---|---|---|---|---|---|"]
    for a in AGENTS:
        stamp = {"iso_uuid": "`Current time: 2026-11-25T10:31:07Z` + conversation UUID",
                 "utc_req": "`Now: 2026-11-25 10:31:07 UTC (request req_...)`",
                 None: "none (static)"}[a.stamp]
        extra = f" + {len(a.few_shot)} few-shot turns" if a.few_shot else ""
        lines.append(f"| {a.name} | {_pct(a.share)} | {len(a.system.split())} words{extra} "
                     f"| {len(a.tools)} | {a.completion_tokens} | {stamp} "
                     f"| {agents.get(a.name, 0)} |")
    lines += [
        "", f"Every request has the agent's tools. {_pct(ACT_SHARE)} of first-time prompts are "
        "*act* steps (`tool_choice: auto`: the mock answers with a tool call, 5 completion "
        "tokens), the rest *answer* steps (`tool_choice: none`: a text answer of the agent's "
        "answer length). Repeats, variants and paraphrases keep their source's agent and step.",
        "", "| category | target | generated | what it is | why this share |",
        "|---|---|---|---|---|",
        f"| exact | 30% | {cats.get('exact', 0)} | an earlier body re-sent byte for byte; "
        f"{_pct(RETRY_SHARE)} a retry of one of the last {RETRY_WINDOW} requests, the rest "
        f"drawn by Pareto({PARETO_ALPHA}) popularity | SDK/framework retries after timeouts "
        "and 429/5xx, re-runs of a failed workflow from a checkpoint, eval and CI loops "
        "replaying fixed prompts, several agent instances reaching the same step with the same "
        "inputs; the share is the brief's assumption, not a measured fleet's |",
        f"| normalized | 10% | {cats.get('normalized', 0)} | stamped agents: an earlier "
        "question asked again with a new time and id (30% also with a surface change); static "
        "agents: the user text with a different case, spacing or trailing punctuation | for a "
        "stamped agent every re-ask is a new body; humans and templating code vary case and "
        "punctuation |",
        f"| paraphrase | 8% | {cats.get('paraphrase', 0)} | `b` of a paraphrase pair whose `a` "
        "the same agent sent earlier in the same step | users rephrase; few agents rephrase "
        "themselves (their prompts come from code), so this share is modest |",
        f"| near_miss | 10% | {cats.get('near_miss', 0)} | `b` of a hard-negative pair whose "
        "`a` the same agent sent earlier in the same step | the same question about another "
        "order, version, number or name is common in agent traffic; 10% rather than the 5% "
        "first planned so that a 3,000-request run sends every one of the 300 pairs once "
        "(precision is the point; a sample of half the pairs could miss the few the cache "
        "gets wrong) |",
        f"| unique | 42% | {cats.get('unique', 0)} | first-time prompts: per-agent templates "
        f"with slot values ({cats.get('unique', 0) - sum(w['unique_from_pairs'].values())}), "
        f"and the `a` sides of the pairs above ({sum(w['unique_from_pairs'].values())}) | "
        "the rest of the traffic; many templated uniques differ from each other in one word "
        "or value (`How do I add a teammate` / `remove a teammate`), which is what a "
        "semantic tier has to tell apart |", "",
        "How the repeats and variants split: " + ", ".join(
            f"{k} {v}" for k, v in sorted(w["details"].items())) + ". The ten most repeated "
        "meanings were sent " + ", ".join(str(x) for x in w["top_meaning_requests"]) + " times.",
        ""]
    return lines


def report(results: dict[str, Any], command: str) -> str:
    """The markdown report."""
    m = results["machine"]
    runs = results["runs"]
    w = results["workload"]
    n = results["requests"]
    lines = [
        "# Response cache on a synthetic agent workload", "",
        f"Command: `{command}`  ",
        f"Revision: {m['git']}; {m['cpu_model']}, {m['nproc']} cores, Python {m['python']}. "
        f"Wall time per configuration: " + ", ".join(
            f"{k} {a['seconds']:.0f} s" for k, a in runs.items()) + ".", "",
        "What it measures: how many requests of an agent fleet the response cache answers, "
        "by which tier, how many of those answers were wrong (an answer made for a request "
        "that means something else), and the money saved. Latency is out of scope (see "
        "`loadtest/REPORT-cache.md` for the hit path). Each configuration gets a fresh "
        "sidecar with a fresh local "
        "cache and the same stream, sent one request at a time, every answer stored before "
        "the next request: the ideal case for the cache (no concurrent duplicates in flight, "
        "no expiry, no eviction).", "",
        "Configurations: **default** = exact + normalized tiers (shipped defaults); "
        "**semantic 0.90** = plus the semantic tier at its default threshold; **semantic "
        "0.95** = the semantic tier at a stricter threshold; **semantic + verifier** = the "
        "semantic tier with `semantic_verifier: minilm-l6` at its defaults (static "
        "candidates from 0.85, all-MiniLM-L6-v2 must rate them 0.98 or more).", "",
        "## Results", "", *_summary_table(results), "",
        "*hit rate* = hits / requests; *wrong / hits* = wrong hits / hits; *hittable* = "
        "requests whose meaning was already asked earlier in the stream (the most a perfect "
        f"cache could answer: {runs['default']['hittable']:,} of {n:,}); *recall* = correct "
        "hits / hittable; *distinct prompts*: different (request meaning, served answer) "
        "pairs among the wrong hits (a wrongly answered prompt that is repeated is wrong "
        "again each time). " + ("Upstream calls equal the misses in every run." if all(
            a["upstream_calls"] == a["misses"] for a in runs.values()) else
            "**Upstream calls differ from the misses in some run** (see the raw results)."),
        ""]
    for name, a in runs.items():
        lines += [f"### {name}: hits by request category", "", *_category_table(a), ""]
    lines += ["## Money", "",
              f"Prices per 1M tokens ({PRICES_AS_OF}): " + "; ".join(
                  f"{k} ${v[0]:.2f} input, ${v[1]:.2f} output, ${v[2]:.3f} cached input"
                  for k, v in PRICES.items()) + ". The requests name gpt-4o-mini; the gpt-4o "
              "rows price the same tokens as if the fleet ran on gpt-4o. Input tokens = body "
              "bytes / 4; output tokens = the served answer's `usage.completion_tokens`. "
              "*Without cache* prices every request; *with cache* only the misses; *saved by "
              "correct hits* leaves out wrong hits (their money is not a saving: the request "
              "has to be answered again, by someone); the last column prices every saved input "
              "token at the provider's cached-input rate, a lower bound for fleets whose long "
              "shared system prompts already get OpenAI's automatic prompt caching.", "",
              *_money_table(results), ""]
    lines += _workload_section(w, n)
    lines += _reading(results)
    return "\n".join(lines)


def _distinct_wrong(a: dict[str, Any], tier: str) -> list[tuple[str, str, int]]:
    """(request text, text whose answer was served, times) of one tier's wrong hits."""
    seen: Counter[tuple[str, str]] = Counter()
    shown: dict[tuple[str, str], tuple[str, str]] = {}
    for e in a["wrong_examples"]:
        if e["tier"] == tier:
            text, served = e["text"].strip(), (e["served_for_text"] or "?").strip()
            key = (norm_key(text), norm_key(served))
            seen[key] += 1
            shown.setdefault(key, (text, served))
    return [(*shown[key], k) for key, k in seen.items()]


def _findings(results: dict[str, Any]) -> list[str]:
    """The Reading's prose, from the numbers of this run."""
    runs = results["runs"]
    d = runs["default"]
    n = d["requests"]
    stamped = [a.name for a in AGENTS if a.stamp]
    norm_hits = d["tiers"].get("normalized", 0)
    norm_stamped = sum(d["by_agent"].get(x, {}).get("normalized", 0) for x in stamped)
    cats = d["by_category"]
    mini, big = d["money"]["gpt-4o-mini"], d["money"]["gpt-4o"]
    out = [
        f"**Exact + normalized (the default) answer {_pct(d['hit_rate'])} of this fleet's "
        f"requests** ({d['hits']:,} of {n:,}: {d['tiers'].get('exact', 0):,} exact, "
        f"{norm_hits:,} normalized), {_pct(d['recall'])} of what a perfect cache could answer. "
        f"{cats['exact']['requests'] - cats['exact'].get('miss', 0)} of the "
        f"{cats['exact']['requests']} exact repeats and "
        f"{cats['normalized']['requests'] - cats['normalized'].get('miss', 0)} of the "
        f"{cats['normalized']['requests']} normalized variants hit, "
        f"{cats['exact'].get('correct', 0)} and {cats['normalized'].get('correct', 0)} of them "
        "correctly" + (" (the rest are the wrong hits below)" if d["wrong_hits"] else "")
        + "; what these tiers leave is the "
        "paraphrases, by design. The normalized tier is not a detail "
        f"here: {norm_stamped:,} of its {norm_hits:,} hits are requests of the stamped agents "
        f"({', '.join(stamped)}), whose system prompt carries a new time and id on every "
        "re-ask, which only volatile-value masking turns into a hit. It also catches repeats of "
        "requests that were themselves hits: a normalized hit is not written back under the "
        "request's own exact key (a semantic hit is), so re-sending a body that was answered "
        "by the normalized tier hits the "
        f"normalized tier again ({cats['exact'].get('normalized', 0)} of the "
        f"{cats['exact']['requests']} exact repeats).", "",
        f"Money: on gpt-4o-mini prices the default saves {_usd(mini['saved'])} of "
        f"{_usd(mini['without_cache'])} ({_pct(mini['saved_share'])}), "
        f"{_usd(mini['saved_per_1k'])} per 1,000 requests; on gpt-4o {_usd(big['saved'])} of "
        f"{_usd(big['without_cache'])}, {_usd(big['saved_per_1k'])} per 1,000 requests "
        f"(a hit averages {d['tokens_per_hit']:,.0f} tokens in + out, any request "
        f"{d['tokens_per_request']:,.0f}). If "
        "the provider's prompt caching already bills the long shared prefixes at the "
        "cached-input rate, the saving is the last column of the money table, "
        f"{_pct(1 - mini['saved_cached_input_rate'] / mini['saved'] if mini['saved'] else 0)} "
        "less.", "",
    ]
    wrong_norm = _distinct_wrong(d, "normalized")
    if d["wrong_hits"]:
        out += [
            f"**Wrong hits without the semantic tier: {d['wrong_hits']}** "
            f"({_pct(d['wrong_share'])} of hits), from {len(wrong_norm)} distinct prompts, "
            "all from the normalized tier:", ""]
        out += [f"- \"{t}\" got the answer to \"{u}\" ({k}x)" for t, u, k in wrong_norm]
        out += [
            "", "These are hard negatives that differ only in the case of a quoted string. "
            "The normalized tier case-folds all prose, and text in quotation marks is prose "
            "to it (only backticks, fences and indented lines count as code), so `\"hello\"` "
            "and `\"Hello\"` get one key; the guard treats quoted text as exact, but it "
            "runs only in the semantic tier. Where the case inside quotes is the question "
            "(a regex, a sort order, `istitle()`), the answer is wrong. The offline check at "
            f"the end finds {len(results['normalizer_merges'])} such pairs among the 300. The "
            "count is inflated by repetition: a wrongly answered prompt stays wrong for the "
            "entry's lifetime, and the most repeated one here was served wrong "
            f"{max(k for _t, _u, k in wrong_norm)} times.", ""]
    else:
        out += ["**No wrong hits without the semantic tier.**", ""]
    for name in ("semantic 0.90", "semantic 0.95", "semantic + verifier"):
        a = runs.get(name)
        if a is None:
            continue
        sem = a["tiers"].get("semantic", 0)
        sem_wrong = a["wrong_by_tier"].get("semantic", 0)
        para = a["by_category"]["paraphrase"]
        extra = a["money"]["gpt-4o-mini"]["saved_per_1k"] - mini["saved_per_1k"]
        extra_big = a["money"]["gpt-4o"]["saved_per_1k"] - big["saved_per_1k"]
        out += [
            f"**{name}**: {sem} semantic hits ({_pct(sem / n)} of requests) lift the hit rate "
            f"from {_pct(d['hit_rate'])} to {_pct(a['hit_rate'])} and answer "
            f"{para.get('correct', 0)} of {para['requests']} paraphrases; **{sem_wrong} of the "
            f"{sem} semantic hits are wrong ({_pct(sem_wrong / sem if sem else 0.0)})**, from "
            f"{len(_distinct_wrong(a, 'semantic'))} distinct prompts. It adds "
            f"{_usd(extra)} per 1,000 requests on gpt-4o-mini ({_usd(extra_big)} on gpt-4o).",
            ""]
    s90 = runs.get("semantic 0.90")
    if s90 is not None:
        pairs = _distinct_wrong(s90, "semantic")
        near = s90["by_category"]["near_miss"].get("semantic", 0)
        if pairs:
            shown = "; ".join(f"\"{t}\" / \"{u}\"" for t, u, _k in pairs[:4])
            out += [
                "The semantic tier's wrong hits (all listed below) are pairs the guard accepted, "
                "so by construction they agree in numbers, negations, quotes, identifiers and "
                "names; they differ in ordinary words (a metric, a grouping, a segment, a "
                f"command), e.g. {shown}. {near} of them are hard negatives, the rest templated "
                "prompts that differ in one slot, which is how agent prompts generated from "
                "code differ, and where a static-embedding tier with a lexical guard answers "
                "wrongly. " + (
                    "Its wrong-hit share on this workload is above the 1% target of "
                    "`REPORT-semantic.md` at every threshold run, for little extra money: "
                    "this supports keeping the tier off by default."
                    if all(r["wrong_by_tier"].get("semantic", 0) > 0.01 * r["tiers"].get(
                        "semantic", 1) for k, r in runs.items() if k.startswith("semantic"))
                    else "Its wrong-hit share meets the 1% target of `REPORT-semantic.md` at "
                    "some threshold here."), ""]
        else:
            out += ["The semantic tier made no wrong hit in this run.", ""]
        stamped_para = sum(s90["by_agent"].get(x, {}).get("paraphrases", 0) for x in stamped)
        stamped_hits = sum(s90["by_agent"].get(x, {}).get("semantic", 0) for x in stamped)
        out += [
            f"**Stamped agents get semantic hits too**: {stamped_hits} of the semantic 0.90 "
            f"run's hits are for {', '.join(stamped)}, whose requests include {stamped_para} "
            "paraphrases. The tier's context is taken after the normalized tier's volatile "
            "masking (`proxy/cache/semantic.py`, `probe`), so a new time and id in the system "
            "prompt no longer make every request a context of its own."]
        versions = [(t, u) for name, a in runs.items() if name.startswith("semantic")
                    for t, u, _k in _distinct_wrong(a, "semantic")
                    if re.search(r"\bv\d+\.\d", t)]
        if versions:
            t, u = versions[0]
            out += [
                "", f"\"{t}\" gets the answer for \"{u}\": the guard does not see versions "
                "written with a `v` prefix. Its number pattern skips digits that follow a "
                "letter or a dot, and its identifier pattern stops at the first dot, so "
                "`v1.5.0` and `v1.6.0` both reduce to the identifier `v1`, while `1.5.0` / "
                "`1.6.0` are refused."]
    out += [
        "", "Limits of this benchmark: the proportions are assumptions, not measurements of a "
        "real fleet; requests run one at a time with every answer stored before the next "
        "(the ideal case: a concurrent fleet loses hits to duplicates in flight, and a real "
        "day loses some to the 1 h TTL, neither of which this run exercises); answers come "
        "from the mock (act steps are 5-token tool calls, so output tokens, and dollars, are "
        "understated for them); the templated unique prompts are closer to each other than "
        "free-form traffic, which makes the semantic tier's job harder than average but "
        "resembles agent traffic generated from code.", ""]
    return out


def _reading(results: dict[str, Any]) -> list[str]:
    runs = results["runs"]
    d, s90 = runs["default"], runs.get("semantic 0.90")
    lines = ["## Reading", "", *_findings(results)]
    lines += ["", "### Near misses by kind", "",
              "| config | " + " | ".join(sorted(d["near_miss_by_kind"])) + " |",
              "|---|" + "---|" * len(d["near_miss_by_kind"])]
    for name, a in runs.items():
        cells = []
        for kind in sorted(d["near_miss_by_kind"]):
            row = a["near_miss_by_kind"].get(kind, {})
            cells.append(f"{row.get('wrong', 0)} wrong / {row.get('requests', 0)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "### Hits per agent", "",
              "| config | agent | stamped | requests | hit rate | paraphrases answered |",
              "|---|---|---|---|---|---|"]
    for name, a in runs.items():
        for agent in AGENTS:
            row = a["by_agent"].get(agent.name, {})
            req = row.get("requests", 0)
            lines.append(f"| {name} | {agent.name} | {'yes' if agent.stamp else 'no'} | {req} "
                         f"| {_pct(row.get('hits', 0) / req) if req else 'n/a'} "
                         f"| {row.get('paraphrase_hits', 0)} / {row.get('paraphrases', 0)} |")
    diag = results["paraphrase_diagnosis"]["rows"]
    if s90 is not None and diag:
        lines += ["", "### Why paraphrases miss (offline: cosine of `a` and `b`, guard verdict)",
                  "", "| contexts | paraphrases | cosine >= 0.90 | >= 0.90 and guard accepts "
                  "| >= 0.95 and guard accepts |", "|---|---|---|---|---|"]
        for stamped in (False, True):
            rows = [r for r in diag if r["stamped"] == stamped]
            lines.append(
                f"| {'stamped' if stamped else 'static'} | {len(rows)} "
                f"| {sum(r['similarity'] >= 0.90 for r in rows)} "
                f"| {sum(r['similarity'] >= 0.90 and not r['guard'] for r in rows)} "
                f"| {sum(r['similarity'] >= 0.95 and not r['guard'] for r in rows)} |")
    lines += ["", "### Wrong hits, all of them", ""]
    for name, a in runs.items():
        ex = a["wrong_examples"]
        lines.append(f"**{name}**: {len(ex)}" + (":" if ex else "."))
        lines.append("")
        for e in ex:
            sim = f" {e['similarity']:.3f}" if e["similarity"] is not None else ""
            lines.append(f"- #{e['idx']} {e['category']} ({e['agent']}), tier {e['tier']}{sim}: "
                         f"\"{e['text'].strip()}\" was served the answer to "
                         f"\"{(e['served_for_text'] or '?').strip()}\" (#{e['served_for_idx']})")
        lines.append("")
    merges = results["normalizer_merges"]
    lines += ["### Offline check: hard negatives the normalized tier merges", "",
              f"Of all 300 pairs in `hard_negatives.jsonl`, {len(merges)} normalize to the "
              "same text (so the normalized tier would serve `a`'s answer to `b` whenever both "
              "are sent in one context):", ""]
    lines += [f"- {p['kind']}: \"{p['a']}\" / \"{p['b']}\"" for p in merges]
    lines.append("")
    return lines


# ---------------------------------------------------------------- main


CONFIGS: tuple[tuple[str, CacheConfig], ...] = (
    ("default", CacheConfig()),
    ("semantic 0.90", CacheConfig(semantic=True, semantic_threshold=0.90)),
    ("semantic 0.95", CacheConfig(semantic=True, semantic_threshold=0.95)),
    ("semantic + verifier", CacheConfig(semantic=True, semantic_verifier="minilm-l6")),
)


async def measure(stream: Sequence[Request]) -> dict[str, Any]:
    """Every configuration over the same stream, against one mock upstream."""
    mock = MockUpstream(MockConfig())
    mock_url = await mock.start()
    runs: dict[str, Any] = {}
    try:
        for name, cache in CONFIGS:
            run = await run_config(name, cache, stream, mock, mock_url)
            a = analyse(run, stream)
            a["cache_config"] = run.cache
            runs[name] = a
            print(f"{name}: hit rate {_pct(a['hit_rate'])} {a['tiers']}, wrong hits "
                  f"{a['wrong_hits']}, upstream calls {a['upstream_calls']}, "
                  f"{a['seconds']:.1f} s", flush=True)
            runs[name]["outcomes"] = [asdict(o) for o in run.outcomes]
    finally:
        await mock.stop()
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Build the stream, run every configuration, write the report and raw results."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--quick", action="store_true", help="600 requests")
    parser.add_argument("--out", type=Path, default=HERE / "REPORT-workload.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 600
    os.environ.setdefault("GIT_OPTIONAL_LOCKS", "0")  # git status must not take the index lock
    stream = StreamBuilder(args.requests, args.seed).build()
    workload = describe_stream(stream)
    workload["seed"] = args.seed
    print(f"stream: {workload['categories']}", flush=True)
    runs = asyncio.run(measure(stream))
    results: dict[str, Any] = {
        "machine": machine_info(), "requests": len(stream), "seed": args.seed,
        "prices_per_1m": PRICES, "prices_as_of": PRICES_AS_OF, "workload": workload,
        "runs": runs, "paraphrase_diagnosis": paraphrase_diagnosis(stream),
        "normalizer_merges": normalizer_merges(),
        "stream": [{"idx": r.idx, "category": r.category, "agent": r.agent, "step": r.step,
                    "meaning": r.meaning, "source": r.source, "detail": r.detail,
                    "text": r.text, "body_bytes": len(r.body)} for r in stream],
    }
    shown = sys.argv[1:] if argv is None else list(argv)
    command = "python -m loadtest.bench_workload" + "".join(" " + a for a in shown)
    args.out.write_text(report(results, command), "utf-8")
    raw = HERE / "results"
    raw.mkdir(exist_ok=True)
    (raw / "workload.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.out} and {raw / 'workload.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
