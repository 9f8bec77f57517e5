"""The OpenAI-compatible HTTP API (`--http-address`): the same core as the gRPC servicers, in
OpenAI's REST shapes. Thin, as api/ is: HTTP <-> domain, OpenAI objects, OpenAI errors."""
