"""Writes examples/support_tickets.jsonl: 3,000 chat requests that classify customer
support tickets, the kind of offline workload teams send as batches. Deterministic."""

from __future__ import annotations

import json
import random
from pathlib import Path

PRODUCTS = ["the mobile app", "the web dashboard", "my invoice", "the API", "two-factor login", "the CSV export",
            "the billing page", "my subscription", "the Slack integration", "password reset emails"]
PROBLEMS = ["keeps crashing when I open it", "shows the wrong total", "returns a 502 error since this morning",
            "was charged twice this month", "does not send the code to my phone", "is missing half the rows",
            "is extremely slow after the last update", "logged me out and I cannot get back in",
            "stopped posting notifications", "never arrive, I checked spam"]
TONES = ["Hi team,", "Hello,", "URGENT:", "Hey there —", "Good morning,", "To whom it may concern,"]
CLOSINGS = ["Thanks!", "Please help asap.", "Regards, Dana", "This is costing us money.", "Cheers", ""]
SYSTEM = ("You are a support triage assistant. Classify the ticket into exactly one of: billing, bug, "
          "outage, account_access, feature_request, other. Answer with JSON: "
          '{"category": ..., "urgency": "low"|"medium"|"high", "summary": <one sentence>}.')


def main() -> None:
    rng = random.Random(20261122)
    out = Path(__file__).with_name("support_tickets.jsonl")
    with open(out, "w") as fh:
        for i in range(3000):
            ticket = (f"{rng.choice(TONES)} {rng.choice(PRODUCTS).capitalize()} {rng.choice(PROBLEMS)}. "
                      f"Order #{rng.randint(10000, 99999)}. {rng.choice(CLOSINGS)}").strip()
            line = {"custom_id": f"ticket-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 120,
                             "messages": [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": ticket}]}}
            fh.write(json.dumps(line) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
