"""I/O adapters: NATS (service wrapper, JetStream, client), Redis, netlink, nftables."""
