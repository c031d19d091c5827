"""The pure core: decisions without I/O (no asyncio, sockets, NATS, Redis or netlink)."""
