"""How a process proves who it is to NATS and keeps its replies private.

Kept apart from the connection code so the permission matrix
(:mod:`vnet.contracts.permissions`) and the client agree on one thing: a user's
replies arrive below ``_INBOX.<user>``, the only inbox that user may subscribe to.
"""

from __future__ import annotations

import ssl
from typing import Any

from vnet.adapters.settings import NatsSettings
from vnet.contracts.permissions import inbox_prefix
from vnet.core import errors as E


def security_options(config: NatsSettings) -> dict[str, Any]:
    """Extra ``nats.connect`` keyword arguments: the inbox prefix and TLS."""
    opts: dict[str, Any] = {}
    prefix = config.nats_inbox_prefix or (inbox_prefix(config.nats_user) if config.nats_user else None)
    if prefix:
        opts["inbox_prefix"] = prefix
    if config.nats_tls_ca or config.nats_tls_cert or config.nats_url.startswith("tls://"):
        opts["tls"] = tls_context(config)
    return opts


def tls_context(config: NatsSettings) -> ssl.SSLContext:
    """Verify the server against ``nats_tls_ca`` (the system's CAs without it); present
    ``nats_tls_cert``/``nats_tls_key`` when given (servers that verify clients)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.nats_tls_ca)
        if config.nats_tls_cert:
            ctx.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise E.make(E.INVALID_CONFIG, f"cannot load the NATS TLS files (nats_tls_ca={config.nats_tls_ca}, "
                     f"nats_tls_cert={config.nats_tls_cert}): {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
