"""The doc examples run the node worker and make namespaces: the same guard as the kernel tests
(a test that changed the root namespace's interfaces, addresses or routes fails)."""

from tests.netns.conftest import root_netns_untouched

__all__ = ["root_netns_untouched"]
