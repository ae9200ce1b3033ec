"""Worker-side code: the client of the service, ``RemoteOptimizer``, and training loops that use them."""

from workers.client import ServiceClient
from workers.remote_optimizer import RemoteOptimizer

__all__ = ["RemoteOptimizer", "ServiceClient"]
