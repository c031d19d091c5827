"""The node worker: one per host, applies desired state to the kernel."""
