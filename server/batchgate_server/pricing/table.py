"""The price table: per-token USD prices as data, with operator overrides.

Prices use LiteLLM's model_info keys, so a deployment's ``model_info`` block and
an override file speak the same language as the shipped ``prices.json``:

    input_cost_per_token            output_cost_per_token            cache_read_input_token_cost
    input_cost_per_token_batches    output_cost_per_token_batches    cache_read_input_token_cost_batches
    cache_creation_input_token_cost             (5-minute prompt-cache writes)
    cache_creation_input_token_cost_above_1hr   (1-hour prompt-cache writes)
    ... and their ``_batches`` twins (cache_creation_input_token_cost_batches, ...)

and long-context tiers: any of those keys with ``_above_<N>k_tokens`` before the
``_batches`` suffix (input_cost_per_token_above_200k_tokens,
output_cost_per_token_above_200k_tokens_batches, ...) is the price of a request
whose prompt exceeds N thousand tokens - the whole request, every token class.

Values are decimal strings (numbers are accepted and converted through ``str``,
so ``1.5e-07`` stays exactly 0.00000015). Every price is per token.

Resolution rules (what a batch is charged), applied to the merged entry:

* batch input/output: the ``*_batches`` key, else half the standard price
  (every provider here advertises 50% off for batch).
* batch cached input: ``cache_read_input_token_cost_batches``, else by provider
  convention when a standard cached price is known:
    - Anthropic (also on Bedrock / Vertex): batch and cache discounts stack ->
      half the standard cached price;
    - Google Gemini: the cache discount takes precedence over the batch one ->
      the standard cached price;
    - OpenAI, Azure and anything else: no cache discount inside a batch is
      assumed -> the batch input price;
  and with no cached price at all, cached tokens are charged at the batch input
  price. A derived cached price never exceeds the batch input price. The chosen
  rule is written into ``ModelPrice.source``.
* batch cache writes (5-minute, 1-hour): the ``*_batches`` key, else half the
  standard write price (batch is 50% off every token class), else for
  Anthropic models (also on Bedrock / Vertex) Anthropic's published
  multipliers of the input price: 1.25x for 5-minute and 2x for 1-hour writes;
  for other models the batch input price (a provider that reports writes
  without pricing them charges them as input). A missing 1-hour price on a
  non-Anthropic model is the 5-minute one.
* tiers: each ``_above_<N>k_tokens`` group is resolved by these same rules over
  the base entry (a class the tier does not price keeps the base's price), and
  applies to requests whose prompt exceeds N*1000 tokens.
* an entry needs an input price (standard or batch); a missing output price
  stays ``None`` and makes any output tokens unpriceable (never silently 0).

Overlaying (override file over builtin, model_info over table) merges keys; if
the overlay sets a standard price but not its batch twin, the base's batch twin
is dropped so it is re-derived from the new standard price instead of staying
stale.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

IN = "input_cost_per_token"
OUT = "output_cost_per_token"
CACHED = "cache_read_input_token_cost"
WRITE = "cache_creation_input_token_cost"
WRITE_1H = "cache_creation_input_token_cost_above_1hr"
BATCH = "_batches"
IN_B = IN + BATCH
OUT_B = OUT + BATCH
CACHED_B = CACHED + BATCH
WRITE_B = WRITE + BATCH
WRITE_1H_B = WRITE_1H + BATCH

STANDARD_KEYS = (IN, OUT, CACHED, WRITE, WRITE_1H)
PRICE_KEYS = STANDARD_KEYS + tuple(k + BATCH for k in STANDARD_KEYS)
# standard key -> its batch twin
_TWINS = {k: k + BATCH for k in STANDARD_KEYS}
# A long-context tier's key: a standard key, "_above_<N>k_tokens", optionally "_batches".
_TIER_KEY = re.compile(r"^(?P<key>" + "|".join(STANDARD_KEYS) + r")_above_(?P<k>[1-9][0-9]{0,5})k_tokens"
                       r"(?P<batch>_batches)?$")
# Anthropic's prompt-cache write prices, as multiples of the input price.
ANTHROPIC_WRITE = Decimal("1.25")
ANTHROPIC_WRITE_1H = Decimal("2")


def tier_key(key: str, threshold: int) -> str:
    """The name of price key `key` (a PRICE_KEYS member) in the tier above `threshold` tokens."""
    base, batch = (key[:-len(BATCH)], BATCH) if key.endswith(BATCH) else (key, "")
    return f"{base}_above_{threshold // 1000}k_tokens{batch}"


def _split_tiers(entry: Mapping[str, Any]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """(the entry without tier keys, {threshold: that tier's keys under their base names})."""
    base: dict[str, Any] = {}
    tiers: dict[int, dict[str, Any]] = {}
    for key, value in entry.items():
        m = _TIER_KEY.match(key)
        if m is None:
            base[key] = value
        else:
            tiers.setdefault(int(m["k"]) * 1000, {})[m["key"] + (m["batch"] or "")] = value
    return base, tiers
# model_info keys naming a provider, most specific first
_PROVIDER_KEYS = ("provider", "litellm_provider", "custom_llm_provider")

_HALF = Decimal("0.5")


def _dec(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: price must be a decimal string or number, got {value!r}")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, (int, float, str)):
        try:
            d = Decimal(str(value).strip())
        except InvalidOperation:
            raise ValueError(f"{where}: not a decimal price: {value!r}") from None
    else:
        raise ValueError(f"{where}: price must be a decimal string or number, got {value!r}")
    if not d.is_finite() or d < 0:
        raise ValueError(f"{where}: price must be finite and >= 0, got {value!r}")
    return d


def _fmt(d: Decimal | None) -> str | None:
    if d is None:
        return None
    return format(d.normalize(), "f") if d else "0"


def _clean_entry(raw: Any, where: str) -> dict[str, Any]:
    """Validate one model entry: price keys become Decimals, provider kept, rest dropped."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: model entry must be a mapping")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if (key in PRICE_KEYS or _TIER_KEY.match(str(key))) and value is not None:
            out[key] = _dec(value, f"{where}.{key}")
    prov = _provider_of(raw)
    if prov:
        out["provider"] = prov
    return out


def _has_prices(info: Mapping[str, Any]) -> bool:
    return any(k in PRICE_KEYS or _TIER_KEY.match(str(k)) for k in info)


def _provider_of(info: Mapping[str, Any]) -> str:
    for key in _PROVIDER_KEYS:
        v = info.get(key)
        if isinstance(v, str) and v:
            return v
    return ""


def _overlay(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key in over:
        m = _TIER_KEY.match(key)
        std = key if key in _TWINS or (m is not None and not m["batch"]) else None
        if std is not None and std + BATCH not in over:
            merged.pop(std + BATCH, None)
    merged.update(over)
    return merged


def _cache_convention(model: str, provider: str) -> str:
    m = model.lower()
    p = provider.lower()
    if "claude" in m or p == "anthropic":
        return "anthropic"
    if "gemini" in m or p in ("vertex_ai", "gemini", "google", "vertex_ai-language-models"):
        return "google"
    return "openai"


@dataclass(frozen=True)
class ModelPrice:
    """Resolved per-token USD prices for one model.

    ``input``, ``output``, ``cached_input``, ``cache_write`` (5-minute prompt-cache
    writes) and ``cache_write_1h`` are the BATCH rates that cost computation uses;
    ``standard_*`` are the synchronous list prices (``None`` when only batch prices
    were given). ``output`` is ``None`` when no output price is known. ``tiers``:
    (threshold, the prices of a request whose prompt exceeds it), ascending.
    """

    input: Decimal
    output: Decimal | None
    cached_input: Decimal
    standard_input: Decimal | None = None
    standard_output: Decimal | None = None
    standard_cached_input: Decimal | None = None
    source: str = ""
    model: str = ""  # the table entry the price came from ("" for model_info only)
    provider: str = ""
    cache_write: Decimal | None = None  # None: as input (a ModelPrice built by hand)
    cache_write_1h: Decimal | None = None  # None: as cache_write
    standard_cache_write: Decimal | None = None
    standard_cache_write_1h: Decimal | None = None
    tiers: tuple[tuple[int, "ModelPrice"], ...] = ()

    @property
    def write_5m(self) -> Decimal:
        return self.input if self.cache_write is None else self.cache_write

    @property
    def write_1h(self) -> Decimal:
        return self.write_5m if self.cache_write_1h is None else self.cache_write_1h

    @property
    def thresholds(self) -> tuple[int, ...]:
        return tuple(t for t, _ in self.tiers)

    def at_tier(self, threshold: int) -> "ModelPrice":
        """The prices of a request in the tier above `threshold` (0: the base prices)."""
        for t, price in self.tiers:
            if t == threshold:
                return price
        return self

    @classmethod
    def resolve(cls, entry: Mapping[str, Any], *, model: str, source: str) -> "ModelPrice | None":
        """Apply the batch/cached rules to a cleaned entry; None without an input price."""
        entry, tier_entries = _split_tiers(entry)
        std_in, std_out, std_cached = entry.get(IN), entry.get(OUT), entry.get(CACHED)
        notes: list[str] = []
        if IN_B in entry:
            b_in = entry[IN_B]
        elif std_in is not None:
            b_in = std_in * _HALF
            notes.append("batch input = 50% of standard")
        else:
            return None
        if OUT_B in entry:
            b_out = entry[OUT_B]
        elif std_out is not None:
            b_out = std_out * _HALF
            notes.append("batch output = 50% of standard")
        else:
            b_out = None
            notes.append("no output price")
        provider = entry.get("provider", "")
        conv = _cache_convention(model, provider)
        if CACHED_B in entry:
            b_cached = entry[CACHED_B]
        elif std_cached is not None:
            if conv == "anthropic":
                b_cached = min(std_cached * _HALF, b_in)
                notes.append("batch cached = 50% of standard cached (discounts stack)")
            elif conv == "google":
                b_cached = min(std_cached, b_in)
                notes.append("batch cached = standard cached (cache discount takes precedence)")
            else:
                b_cached = b_in
                notes.append("batch cached = batch input (no cache discount in batch assumed)")
        else:
            b_cached = b_in
            notes.append("no cached price: cached tokens at batch input price")
        std_write, std_write_1h = entry.get(WRITE), entry.get(WRITE_1H)
        if conv == "anthropic" and std_in is not None:
            std_write = std_in * ANTHROPIC_WRITE if std_write is None else std_write
            std_write_1h = std_in * ANTHROPIC_WRITE_1H if std_write_1h is None else std_write_1h
        b_write = entry.get(WRITE_B, None if std_write is None else std_write * _HALF)
        b_write_1h = entry.get(WRITE_1H_B, None if std_write_1h is None else std_write_1h * _HALF)
        if b_write is None or b_write_1h is None:
            default_write, default_write_1h = _write_defaults(conv, b_in)
            b_write = default_write if b_write is None else b_write
            b_write_1h = (default_write_1h or b_write) if b_write_1h is None else b_write_1h
        if conv == "anthropic" and not any(k in entry for k in (WRITE, WRITE_B, WRITE_1H, WRITE_1H_B)):
            notes.append("cache writes = 1.25x (5-minute) / 2x (1-hour) input")
        tiers = []
        for threshold in sorted(tier_entries):
            tier = cls.resolve(_overlay(entry, tier_entries[threshold]), model=model, source="")
            if tier is not None:
                tiers.append((threshold, tier))
        if notes:
            source = f"{source} ({'; '.join(notes)})"
        return cls(
            input=b_in,
            output=b_out,
            cached_input=b_cached,
            standard_input=std_in,
            standard_output=std_out,
            standard_cached_input=std_cached,
            source=source,
            model=model,
            provider=provider,
            cache_write=b_write,
            cache_write_1h=b_write_1h,
            standard_cache_write=std_write,
            standard_cache_write_1h=std_write_1h,
            tiers=tuple(tiers),
        )

    def _rates(self) -> dict[str, Decimal | None]:
        return {IN_B: self.input, OUT_B: self.output, CACHED_B: self.cached_input, WRITE_B: self.cache_write,
                WRITE_1H_B: self.cache_write_1h, IN: self.standard_input, OUT: self.standard_output,
                CACHED: self.standard_cached_input, WRITE: self.standard_cache_write,
                WRITE_1H: self.standard_cache_write_1h}

    def to_snapshot(self) -> dict[str, Any]:
        """JSON-serialisable; uses the model_info key names, so it is itself a valid model_info."""
        d: dict[str, Any] = {
            "resolved_model": self.model,
            "provider": self.provider,
            "source": self.source,
            **{k: _fmt(v) for k, v in self._rates().items()},
        }
        for threshold, tier in self.tiers:
            d.update({tier_key(k, threshold): _fmt(v) for k, v in tier._rates().items()})
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_snapshot(cls, d: Mapping[str, Any]) -> "ModelPrice":
        """Inverse of ``to_snapshot`` / ``PriceTable.snapshot``. Raises ValueError for an unpriced snapshot."""
        if d.get("priced") is False or IN_B not in d:
            raise ValueError(f"snapshot holds no price for model {d.get('model', '')!r}")
        d, tier_snapshots = _split_tiers(d)

        def opt(key: str) -> Decimal | None:
            v = d.get(key)
            return None if v is None else _dec(v, f"snapshot.{key}")

        b_in = _dec(d[IN_B], f"snapshot.{IN_B}")
        cached = opt(CACHED_B)
        model, provider = str(d.get("resolved_model", "")), str(d.get("provider", ""))
        # Snapshots taken before cache writes were priced: the rule resolve() applies now.
        default_write, default_write_1h = _write_defaults(_cache_convention(model, provider), b_in)
        write = opt(WRITE_B)
        write = default_write if write is None else write
        write_1h = opt(WRITE_1H_B)
        write_1h = (default_write_1h or write) if write_1h is None else write_1h
        return cls(
            input=b_in,
            output=opt(OUT_B),
            cached_input=b_in if cached is None else cached,
            standard_input=opt(IN),
            standard_output=opt(OUT),
            standard_cached_input=opt(CACHED),
            source=str(d.get("source", "")),
            model=model,
            provider=provider,
            cache_write=write,
            cache_write_1h=write_1h,
            standard_cache_write=opt(WRITE),
            standard_cache_write_1h=opt(WRITE_1H),
            tiers=tuple((t, cls.from_snapshot({"resolved_model": model, "provider": provider, **tier_snapshots[t]}))
                        for t in sorted(tier_snapshots) if IN_B in tier_snapshots[t]),
        )


def _write_defaults(convention: str, batch_input: Decimal) -> tuple[Decimal, Decimal | None]:
    """Batch (5-minute, 1-hour) cache-write prices of a model whose table has none: Anthropic's
    multipliers of the input price; elsewhere the input price (1-hour: None, as 5-minute)."""
    if convention == "anthropic":
        return batch_input * ANTHROPIC_WRITE, batch_input * ANTHROPIC_WRITE_1H
    return batch_input, None


# --- model name normalisation -------------------------------------------------

_BEDROCK_REGION = re.compile(r"^(?:us-gov|us|eu|apac|au|ca|jp|global)\.")
_VENDOR_PREFIX = re.compile(r"^(?:anthropic|amazon|meta|mistral|cohere|ai21|openai|google)\.")
_BEDROCK_VERSION = re.compile(r"(?:-v\d+(?::\d+)?|:\d+)$")
_AT_VERSION = re.compile(r"@[^/]*$")
_LATEST = re.compile(r"-latest$")
_DATE = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
_NUM_VERSION = re.compile(r"-\d{3}$")


def _name_candidates(name: str) -> list[str]:
    """Spellings to try, most literal first: as given, lower-cased, without path
    prefixes ("openai/", "publishers/google/models/"), then progressively without
    Bedrock region/vendor prefixes, version tags, "-latest" and date suffixes."""
    base = name.strip()
    forms = [base, base.lower()]
    parts = base.lower().split("/")
    forms += ["/".join(parts[i:]) for i in range(1, len(parts))]
    out: list[str] = list(forms)
    for f in forms:
        for rx in (_BEDROCK_REGION, _VENDOR_PREFIX, _BEDROCK_VERSION, _AT_VERSION, _LATEST, _DATE, _NUM_VERSION):
            f = rx.sub("", f)
            out.append(f)
    seen: set[str] = set()
    return [c for c in out if c and not (c in seen or seen.add(c))]


# --- the table ----------------------------------------------------------------


class PriceTable:
    """Immutable price table. Build with ``load_builtin()`` or ``load_file(path)``."""

    def __init__(
        self,
        models: Mapping[str, Mapping[str, Any]],
        aliases: Mapping[str, str] | None = None,
        *,
        version: str,
        origins: Mapping[str, str] | None = None,
        source: str = "",
    ) -> None:
        self._models = {k: dict(v) for k, v in models.items()}
        self._aliases = dict(aliases or {})
        self.version = version
        self.source = source
        # which layer each entry came from ("builtin@..." or "file:...@...")
        self._origins = {m: (origins or {}).get(m, version) for m in self._models}
        for alias, target in self._aliases.items():
            if target not in self._models:
                raise ValueError(f"alias {alias!r} points to unknown model {target!r}")
        self._resolved: dict[str, str | None] = {}

    # construction

    @staticmethod
    def _parse_doc(doc: Any, where: str) -> tuple[dict[str, dict | None], dict[str, str], str, str]:
        if not isinstance(doc, Mapping):
            raise ValueError(f"{where}: price file must be a mapping")
        currency = doc.get("currency", "USD")
        if currency != "USD":
            raise ValueError(f"{where}: only USD prices are supported, got currency {currency!r}")
        models_raw = doc.get("models") or {}
        if not isinstance(models_raw, Mapping):
            raise ValueError(f"{where}: 'models' must be a mapping")
        models: dict[str, dict | None] = {}
        for name, raw in models_raw.items():
            # null removes a model (override files only)
            models[str(name)] = None if raw is None else _clean_entry(raw, f"{where}: models.{name}")
        aliases_raw = doc.get("aliases") or {}
        if not isinstance(aliases_raw, Mapping):
            raise ValueError(f"{where}: 'aliases' must be a mapping")
        aliases = {str(k): str(v) for k, v in aliases_raw.items()}
        return models, aliases, str(doc.get("version", "") or ""), str(doc.get("source", "") or "")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, version: str | None = None) -> "PriceTable":
        """A standalone table from a document in the prices.json format."""
        models, aliases, doc_version, source = cls._parse_doc(doc, "price table")
        return cls({k: v for k, v in models.items() if v is not None}, aliases,
                   version=version or f"dict@{doc_version or 'unversioned'}", source=source)

    @classmethod
    def load_builtin(cls) -> "PriceTable":
        text = resources.files(__package__).joinpath("prices.json").read_text(encoding="utf-8")
        models, aliases, version, source = cls._parse_doc(json.loads(text), "builtin prices.json")
        return cls({k: v for k, v in models.items() if v is not None}, aliases,
                   version=f"builtin@{version}", source=source)

    @classmethod
    def load_file(cls, path: str | Path, *, base: "PriceTable | None" = None) -> "PriceTable":
        """Operator override file (JSON, or YAML by .yaml/.yml suffix) merged over ``base``
        (default: the builtin table). Entries merge key by key; ``null`` removes a model."""
        p = Path(path)
        raw = p.read_bytes()
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(raw) or {}
        else:
            doc = json.loads(raw)
        models, aliases, version, source = cls._parse_doc(doc, str(p))
        base = base if base is not None else cls.load_builtin()
        version = version or "sha256:" + hashlib.sha256(raw).hexdigest()[:12]
        layer = f"file:{p}@{version}"
        merged = {k: dict(v) for k, v in base._models.items()}
        origins = dict(base._origins)
        merged_aliases = dict(base._aliases)
        for name, entry in models.items():
            if entry is None:
                merged.pop(name, None)
                origins.pop(name, None)
                merged_aliases = {a: t for a, t in merged_aliases.items() if t != name}
                continue
            merged[name] = _overlay(merged.get(name, {}), entry)
            origins[name] = layer if name not in base._models else f"{layer} over {base._origins[name]}"
            merged_aliases.pop(name, None)  # a real entry beats an alias of the same name
        merged_aliases.update(aliases)
        return cls(merged, merged_aliases, version=layer, origins=origins,
                   source=source or base.source)

    # lookup

    def models(self) -> list[str]:
        return sorted(self._models)

    def resolve_name(self, model: str) -> str | None:
        """The table entry a model name maps to (exact, alias, or normalised spelling)."""
        if model in self._resolved:
            return self._resolved[model]
        found: str | None = None
        for cand in _name_candidates(model):
            if cand in self._models:
                found = cand
                break
            if cand in self._aliases:
                found = self._aliases[cand]
                break
        if len(self._resolved) > 4096:
            self._resolved.clear()
        self._resolved[model] = found
        return found

    def _entry(self, model: str) -> tuple[str, dict[str, Any]] | None:
        name = self.resolve_name(model) if model else None
        return None if name is None else (name, self._models[name])

    def price_for(self, model: str, model_info: Mapping[str, Any] | None = None) -> ModelPrice | None:
        """Price for ``model``; price keys (or ``base_model``) in ``model_info`` win over the table."""
        if model_info and (_has_prices(model_info) or model_info.get("base_model")):
            return self.with_overrides(model, model_info)
        hit = self._entry(model)
        if hit is None:
            return None
        name, entry = hit
        return ModelPrice.resolve(entry, model=name, source=self._origins[name])

    def with_overrides(self, model: str, model_info: Mapping[str, Any]) -> ModelPrice | None:
        """Per-deployment model_info keys over the table entry for ``model_info['base_model']``
        (LiteLLM's convention for Azure deployment names) or ``model``."""
        over = _clean_entry(model_info, f"model_info for {model!r}")
        base_name = model_info.get("base_model") or model
        hit = self._entry(str(base_name))
        if hit is None:
            name, entry, origin = "", {}, ""
        else:
            name, entry = hit
            origin = self._origins[name]
        has_prices = _has_prices(over)
        merged = _overlay(entry, over)
        if not has_prices:
            source = origin
        elif origin:
            source = f"model_info over {origin}"
        else:
            source = "model_info"
        return ModelPrice.resolve(merged, model=name or model, source=source)

    def snapshot(self, model: str, model_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The price in force now, as a JSON-serialisable dict to store with a batch.
        ``ModelPrice.from_snapshot`` turns it back into the same ModelPrice."""
        price = self.price_for(model, model_info)
        d: dict[str, Any] = {"model": model, "currency": "USD", "table_version": self.version,
                             "priced": price is not None}
        if price is not None:
            d.update(price.to_snapshot())
        return d


_BUILTIN: PriceTable | None = None


def builtin_table() -> PriceTable:
    """Process-wide cached builtin table."""
    global _BUILTIN
    if _BUILTIN is None:
        _BUILTIN = PriceTable.load_builtin()
    return _BUILTIN
