"""VNet: the virtual network layer of a container network fabric.

The public Python surface is small on purpose::

    from vnet import VNetManager, VNetConfig, DriverType, IsolationMode, VirtualNetwork, Endpoint

Exceptions raised by the client (all in :mod:`vnet.errors`)::

    VNetError                 base: .code (stable string), .status (HTTP meaning), .message, .details
    ├── InvalidRequest        400  the request was malformed or a value is invalid
    ├── NotFound              404  the thing named does not exist
    ├── Conflict              409  it clashes with something that exists (the holder is named)
    ├── Unavailable           503  exhausted, or a dependency is down; retry later
    └── InternalError         500  a bug on our side; the trace id finds it
"""

# `vnet` is split over two source trees (shared/ and services/); in an editable
# install both are on sys.path, so extend the package path to see the other half.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from vnet.client import VNetManager
from vnet.core.model import DriverType, Endpoint, IsolationMode, VirtualNetwork
from vnet.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    NotFound,
    Unavailable,
    VNetError,
)
from vnet.runtime.config import VNetConfig

__version__ = "0.1.0"

__all__ = [
    "Conflict",
    "DriverType",
    "Endpoint",
    "InternalError",
    "InvalidRequest",
    "IsolationMode",
    "NotFound",
    "Unavailable",
    "VNetConfig",
    "VNetError",
    "VNetManager",
    "VirtualNetwork",
    "__version__",
]
