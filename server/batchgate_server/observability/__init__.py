"""Metrics, structured logs and the gRPC interceptor that feeds them. Core reaches this layer only
through core/events.py (app.py wires the implementation in), so it never imports prometheus."""
