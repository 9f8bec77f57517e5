"""Pure pricing: the price table, usage summing over batch output, and cost computation."""

from batchgate_server.pricing.cost import compute_cost
from batchgate_server.pricing.table import ModelPrice, PriceTable, builtin_table
from batchgate_server.pricing.usage import sum_usage_from_output, sum_usage_from_output_async

__all__ = [
    "ModelPrice",
    "PriceTable",
    "builtin_table",
    "compute_cost",
    "sum_usage_from_output",
    "sum_usage_from_output_async",
]
