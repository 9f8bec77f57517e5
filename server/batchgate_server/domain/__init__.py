"""The ground layer: domain types every other layer shares. It imports nothing of batchgate's."""
