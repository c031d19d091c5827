"""The metrics service: Prometheus /metrics from state, events and service reports."""
