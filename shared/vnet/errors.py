"""The exception tree (see :mod:`vnet` docstring); codes live in :mod:`vnet.core.errors`."""

from vnet.core.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    NotFound,
    Unavailable,
    VNetError,
    all_codes,
)

__all__ = ["Conflict", "InternalError", "InvalidRequest", "NotFound", "Unavailable", "VNetError", "all_codes"]
