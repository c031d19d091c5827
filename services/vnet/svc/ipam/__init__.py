"""The ipam service."""
