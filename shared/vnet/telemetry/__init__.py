"""Tracing (W3C context in NATS headers), operation metrics, logging."""
