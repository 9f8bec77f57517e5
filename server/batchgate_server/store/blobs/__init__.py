"""Blob stores: local disk (local.py); object storage implementations sit beside it."""
