"""Blob store implementations: local disk (local.py), S3 (s3.py), GCS (gcs.py)."""

from batchgate_server.store.blobs.local import BlobStore, BlobWriter, LocalBlobStore, LocalBlobWriter

__all__ = ["BlobStore", "BlobWriter", "LocalBlobStore", "LocalBlobWriter"]
