"""The endpoint service."""
