"""Resource ids shaped like OpenAI's ("file-…", "batch_…") so callers recognise them."""

import secrets


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def new_key_secret() -> str:
    return "bg-" + secrets.token_urlsafe(32)
