"""Usage and cost of a batch, decided once, when it ends.

Usage is summed from the normalised output lines in the same pass that writes
the output file (the built-in executor counts each line as it writes it to its
results log instead: UsageCounter.add_parsed); cost comes from the price
snapshot taken when the batch was created. Both go onto the batch and into one
ledger row, in the transaction that records the terminal state, so restarts and
repeated reads never count twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from batchgate_server.domain.models import BatchRecord, Cost, Usage
from batchgate_server.pricing.cost import amount_to_nanos, compute_cost
from batchgate_server.pricing.table import BATCH, ModelPrice, PriceTable
from batchgate_server.pricing.usage import UsageKey, add_output_line, add_parsed_line, merge_tiers, usage_of
from batchgate_server.providers.base import OutputUsage


class UsageCounter(OutputUsage):
    """Accumulates usage per (model, long-context tier) from output lines fed one at a time;
    thresholds: the tiers of the batch's price (ModelPrice.thresholds)."""

    def __init__(self, thresholds: tuple[int, ...] = ()) -> None:
        self._thresholds = thresholds
        self._counts: dict[UsageKey, list[int]] = {}

    @property
    def by_tier(self) -> dict[UsageKey, Usage]:
        return {key: usage_of(counts) for key, counts in self._counts.items()}

    @property
    def by_model(self) -> dict[str, Usage]:
        return merge_tiers(self.by_tier)

    def add_line(self, line: bytes) -> None:
        add_output_line(self._counts, line, self._thresholds)

    def add_parsed(self, line: dict) -> None:
        """One output line its writer holds parsed already: counted without a second parse."""
        add_parsed_line(self._counts, line, "", self._thresholds)


def _snapshot_price(rec: BatchRecord) -> ModelPrice | None:
    snapshot = rec.price or {}
    return ModelPrice.from_snapshot(snapshot) if snapshot.get("priced") else None


class Accounting:
    def __init__(self, prices: PriceTable) -> None:
        self.prices = prices

    def snapshot(self, model: str, model_info: Mapping[str, Any] | None, provider: str = "") -> dict[str, Any]:
        snapshot = self.prices.snapshot(model, model_info)
        explicit_batch_price = any(k.endswith(BATCH) for k in (model_info or {}))
        if provider == "openai_compatible" and snapshot.get("priced") and not explicit_batch_price:
            # The built-in executor sends real-time requests: an upstream that bills per token
            # bills them at its standard rate, not the batch discount (every token class, every tier).
            for batch_key in [k for k in snapshot if k.endswith(BATCH)]:
                standard = snapshot.get(batch_key[:-len(BATCH)])
                if standard is not None:
                    snapshot[batch_key] = standard
            snapshot["source"] = f"standard rate (the built-in executor makes real-time requests); {snapshot.get('source', '')}"
        return snapshot

    def usage_counter(self, rec: BatchRecord) -> UsageCounter:
        price = _snapshot_price(rec)
        return UsageCounter(price.thresholds if price is not None else ())

    def price(self, rec: BatchRecord, usage_by_model: Mapping[UsageKey, Usage]) -> tuple[Usage, Cost]:
        """(total usage, cost) of usage per (model, tier) (or per model: the base tier)."""
        total = Usage()
        for usage in usage_by_model.values():
            total.add(usage)
        snapshot = rec.price or {}
        price = _snapshot_price(rec)
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

    def ledger_row(self, rec: BatchRecord, usage_by_tier: Mapping[UsageKey, Usage] | None,
                   cost: Cost | None = None) -> dict[str, Any]:
        usage_by_model = merge_tiers(usage_by_tier or {})
        total = Usage()
        for usage in usage_by_model.values():
            total.add(usage)
        cost = cost or self.nothing_to_charge(rec)
        return {
            "batch_id": rec.id, "project": rec.project, "api_key_id": rec.api_key_id, "model": rec.model,
            "provider": rec.provider, "deployment_id": rec.deployment_id, "created_at": rec.created_at,
            "ended_at": time.time(), "input_tokens": total.input_tokens, "cached_tokens": total.cached_tokens,
            "output_tokens": total.output_tokens, "reasoning_tokens": total.reasoning_tokens,
            "cache_creation_tokens": total.cache_creation_tokens,
            "cache_creation_1h_tokens": total.cache_creation_1h_tokens,
            "cost_status": cost.status, "cost_amount": cost.amount,
            "cost_nanos": amount_to_nanos(cost.amount) if cost.status == "known" else None,
            "metadata": json.dumps(rec.metadata),
            "usage_by_model": json.dumps({m: vars(u) for m, u in usage_by_model.items()}),
            "parent_batch_id": rec.parent_id or None,  # a shard's row: UsageService counts its batch once
        }
