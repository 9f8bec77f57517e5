"""Usage and cost of a batch, decided once, when it ends.

Usage is summed from the normalised output lines in the same pass that writes
the output file; cost comes from the price snapshot taken when the batch was
created. Both go onto the batch and into one ledger row, in the transaction that
records the terminal state, so restarts and repeated reads never count twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from batchgate_server.domain.models import BatchRecord, Cost, Usage
from batchgate_server.pricing.cost import amount_to_nanos, compute_cost
from batchgate_server.pricing.table import ModelPrice, PriceTable
from batchgate_server.pricing.usage import sum_usage_from_output

_FLUSH_LINES = 2048
STANDARD_FOR_BATCH = (
    ("input_cost_per_token_batches", "input_cost_per_token"),
    ("output_cost_per_token_batches", "output_cost_per_token"),
    ("cache_read_input_token_cost_batches", "cache_read_input_token_cost"),
)


class UsageCounter:
    """Accumulates usage per model from output lines fed one at a time."""

    def __init__(self) -> None:
        self._by_model: dict[str, Usage] = {}
        self._pending: list[bytes] = []

    @property
    def by_model(self) -> dict[str, Usage]:
        self.flush()
        return self._by_model

    def add_line(self, line: bytes) -> None:
        self._pending.append(line)
        if len(self._pending) >= _FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        for model, usage in sum_usage_from_output(self._pending).items():
            self._by_model.setdefault(model, Usage()).add(usage)
        self._pending.clear()


class Accounting:
    def __init__(self, prices: PriceTable) -> None:
        self.prices = prices

    def snapshot(self, model: str, model_info: Mapping[str, Any] | None, provider: str = "") -> dict[str, Any]:
        snapshot = self.prices.snapshot(model, model_info)
        explicit_batch_price = any(k.endswith("_batches") for k in (model_info or {}))
        if provider == "openai_compatible" and snapshot.get("priced") and not explicit_batch_price:
            # The built-in executor sends real-time requests: an upstream that bills per token
            # bills them at its standard rate, not the batch discount.
            for batch_key, standard_key in STANDARD_FOR_BATCH:
                if snapshot.get(standard_key) is not None:
                    snapshot[batch_key] = snapshot[standard_key]
            snapshot["source"] = f"standard rate (the built-in executor makes real-time requests); {snapshot.get('source', '')}"
        return snapshot

    def usage_counter(self) -> UsageCounter:
        return UsageCounter()

    def price(self, rec: BatchRecord, usage_by_model: Mapping[str, Usage]) -> tuple[Usage, Cost]:
        total = Usage()
        for usage in usage_by_model.values():
            total.add(usage)
        snapshot = rec.price or {}
        price = ModelPrice.from_snapshot(snapshot) if snapshot.get("priced") else None
        # Where the price came from: the table layer, or the deployment's model_info over it.
        source = (price.source if price is not None else "") or snapshot.get("table_version", "")
        # A batch runs one model; every model name its outputs report is priced at the
        # snapshot (providers report dated names such as gpt-4o-mini-2024-07-18).
        cost = compute_cost(usage_by_model, lambda _model: price, price_source=source)
        if cost.status == "unknown" and not price:
            priced_as = snapshot.get("model") or rec.model
            table = snapshot.get("table_version") or "the price table"
            cost.reason = (f"no price for model {priced_as!r} (deployment of {rec.model!r}) in {table} when the "
                           "batch was created; set input/output_cost_per_token in the deployment's model_info "
                           "or in a --prices file")
        return total, cost

    def nothing_to_charge(self, rec: BatchRecord) -> Cost:
        return Cost(status="known", amount="0", input_amount="0", output_amount="0",
                    price_source=(rec.price or {}).get("table_version", ""))

    def ledger_row(self, rec: BatchRecord, usage_by_model: Mapping[str, Usage] | None,
                   cost: Cost | None = None) -> dict[str, Any]:
        total = Usage()
        for usage in (usage_by_model or {}).values():
            total.add(usage)
        cost = cost or self.nothing_to_charge(rec)
        return {
            "batch_id": rec.id, "project": rec.project, "api_key_id": rec.api_key_id, "model": rec.model,
            "provider": rec.provider, "deployment_id": rec.deployment_id, "created_at": rec.created_at,
            "ended_at": time.time(), "input_tokens": total.input_tokens, "cached_tokens": total.cached_tokens,
            "output_tokens": total.output_tokens, "reasoning_tokens": total.reasoning_tokens,
            "cost_status": cost.status, "cost_amount": cost.amount,
            "cost_nanos": amount_to_nanos(cost.amount) if cost.status == "known" else None,
            "metadata": json.dumps(rec.metadata),
            "usage_by_model": json.dumps({m: vars(u) for m, u in (usage_by_model or {}).items()}),
            "parent_batch_id": rec.parent_id or None,  # a shard's row: UsageService counts its batch once
        }
