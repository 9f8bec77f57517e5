"""Turn per-model usage into a ``domain.models.Cost`` with exact decimal amounts.

Charging rules (OpenAI usage semantics):

* ``cached_tokens`` are a subset of ``input_tokens``: the uncached part is
  charged at the batch input price, the cached part at the batch cached price
  (cached is clamped to input_tokens if a provider reports more).
* ``cache_creation_tokens`` (prompt-cache writes) are a subset of
  ``input_tokens`` too, charged at the batch cache-write price:
  ``cache_creation_1h_tokens`` of them at the 1-hour price, the rest at the
  5-minute price (clamped so that reads + writes never exceed input_tokens).
  They are part of ``input_amount``.
* ``reasoning_tokens`` are a subset of ``output_tokens`` and are charged as
  output; they are not charged twice.
* Long-context tiers: usage keyed by (model, tier) is charged at the rates of
  that tier (``ModelPrice.at_tier``); a plain model key is the base tier.
* Amounts are computed exactly (Decimal, 50-digit context), then each part is
  rounded half-up to 1e-9 USD (a nano-dollar) and ``amount`` is the sum of the
  rounded parts, so ``amount == input_amount + output_amount`` always holds; the
  rounding error is at most 1e-9 USD per part. Strings are plain notation with
  trailing zeros removed ("0.0000435", "12.5", "0").
* A model with usage but no price (or with output tokens but no output price)
  makes the whole cost ``unknown`` with a reason naming the model(s); amounts
  are then "" and never "0". No usage at all (e.g. every request failed) is
  ``known`` with amount "0".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Context, Decimal

from batchgate_server.domain.models import Cost, Usage
from batchgate_server.pricing.table import ModelPrice
from batchgate_server.pricing.usage import UsageKey

QUANTUM = Decimal("1e-9")
_CTX = Context(prec=50)


def _fmt(d: Decimal) -> str:
    return format(d.normalize(), "f") if d else "0"


def _q(d: Decimal) -> Decimal:
    return d.quantize(QUANTUM, rounding=ROUND_HALF_UP, context=_CTX)


def _part(n: int, of: int) -> int:
    return min(max(n, 0), of)


def usage_amounts(usage: Usage, price: ModelPrice) -> tuple[Decimal, Decimal | None]:
    """Exact (input, output) amounts for one model; output None when unpriceable."""
    prompt = max(usage.input_tokens, 0)
    cached = _part(usage.cached_tokens, prompt)
    written = _part(usage.cache_creation_tokens, prompt - cached)
    written_1h = _part(usage.cache_creation_1h_tokens, written)
    uncached = prompt - cached - written
    mul, add = _CTX.multiply, _CTX.add
    inp = add(mul(Decimal(uncached), price.input), mul(Decimal(cached), price.cached_input))
    if written:
        inp = add(inp, add(mul(Decimal(written - written_1h), price.write_5m),
                           mul(Decimal(written_1h), price.write_1h)))
    out_tokens = max(usage.output_tokens, 0)
    if price.output is None:
        return inp, (Decimal(0) if out_tokens == 0 else None)
    return inp, mul(Decimal(out_tokens), price.output)


def _model_and_tier(key: str | UsageKey) -> UsageKey:
    return key if isinstance(key, tuple) else (key, 0)


def compute_cost(
    usage_by_model: Mapping[str, Usage] | Mapping[UsageKey, Usage],
    price_for: Callable[[str], ModelPrice | None],
    *,
    price_source: str,
) -> Cost:
    """Cost of a batch from its per-model (or per (model, tier)) usage. See the module docstring
    for the rules."""
    total_in = Decimal(0)
    total_out = Decimal(0)
    missing: list[str] = []
    no_output_price: list[str] = []
    for key in sorted(usage_by_model, key=_model_and_tier):
        usage = usage_by_model[key]
        model, tier = _model_and_tier(key)
        if usage.input_tokens <= 0 and usage.output_tokens <= 0:
            continue  # nothing to charge, whether or not the model has a price
        price = price_for(model)
        if price is None:
            if (model or "<no model name>") not in missing:
                missing.append(model or "<no model name>")
            continue
        inp, out = usage_amounts(usage, price.at_tier(tier))
        if out is None:
            if model not in no_output_price:
                no_output_price.append(model)
            continue
        total_in = _CTX.add(total_in, inp)
        total_out = _CTX.add(total_out, out)

    if missing or no_output_price:
        reasons = []
        if missing:
            reasons.append("no price for model(s): " + ", ".join(missing))
        if no_output_price:
            reasons.append("no output price for model(s): " + ", ".join(no_output_price))
        return Cost(status="unknown", currency="USD", amount="", input_amount="", output_amount="",
                    reason="; ".join(reasons), price_source=price_source)

    q_in, q_out = _q(total_in), _q(total_out)
    return Cost(
        status="known",
        currency="USD",
        amount=_fmt(_CTX.add(q_in, q_out)),
        input_amount=_fmt(q_in),
        output_amount=_fmt(q_out),
        reason="",
        price_source=price_source,
    )


NANOS_PER_UNIT = 10**9


def amount_to_nanos(amount: str) -> int | None:
    """An exact amount string ("0.002962575") as an integer of 1e-9 USD; None when it is empty,
    malformed or finer than a nano-dollar (compute_cost never produces such amounts)."""
    try:
        d = Decimal(amount)
    except (ArithmeticError, ValueError, TypeError):
        return None
    if not d.is_finite() or d < 0:
        return None
    nanos = _CTX.multiply(d, NANOS_PER_UNIT)
    if nanos != nanos.to_integral_value():
        return None
    return int(nanos)


def nanos_to_amount(nanos: int) -> str:
    """Inverse of amount_to_nanos, in the same plain notation as Cost amounts ("0.3", "12", "0")."""
    return _fmt(_CTX.divide(Decimal(nanos), NANOS_PER_UNIT))


def sum_costs(costs: Sequence[Cost]) -> Cost:
    """The cost of a batch run as several jobs (domain/shards.py): the exact sum of its shards'
    costs. Unknown when any part is, with their reasons; price sources joined, each once."""
    sources = ", ".join(dict.fromkeys(c.price_source for c in costs if c.price_source))
    unknown = [c for c in costs if c.status != "known"]
    if unknown:
        reasons = "; ".join(dict.fromkeys(c.reason or f"a part's cost is {c.status}" for c in unknown))
        return Cost(status="unknown", currency="USD", amount="", input_amount="", output_amount="",
                    reason=reasons, price_source=sources)
    add = _CTX.add
    total_in, total_out = Decimal(0), Decimal(0)
    for c in costs:
        total_in = add(total_in, Decimal(c.input_amount or "0"))
        total_out = add(total_out, Decimal(c.output_amount or "0"))
    return Cost(status="known", currency="USD", amount=_fmt(add(total_in, total_out)), input_amount=_fmt(total_in),
                output_amount=_fmt(total_out), reason="", price_source=sources)
