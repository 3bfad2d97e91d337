"""One sandbox pool per process, shared by every code tool of that process while any of them is open.

Rollout loops make an env per episode; a pool per env would start a worker (an interpreter, numpy,
PIL, namespaces) per episode. The shared pool is started by the first tool, kept while any tool holds
it, and closed when the last one closes or is collected. A forked child starts with no pool: one it
inherited belongs to its parent (``SandboxPool`` then starts workers of the child's own on first use).
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from .pool import SandboxPool

# Re-entrant: a tool collected by the garbage collector while this thread starts a pool (inside acquire)
# releases from within it.
_lock = threading.RLock()
_pool: Optional[SandboxPool] = None
_users = 0


def acquire() -> SandboxPool:
    """The process's pool, started if needed (raises ``SandboxUnavailable`` where it cannot be built)."""
    global _pool, _users
    with _lock:
        if _pool is None:
            _pool = SandboxPool(size=1)
        _users += 1
        return _pool


def release(pool: SandboxPool) -> None:
    """Give back one ``acquire``; the last one closes the pool."""
    global _pool, _users
    with _lock:
        if pool is not _pool:  # inherited from the parent process, or already closed
            return
        _users -= 1
        if _users == 0:
            _pool, pool_to_close = None, _pool
            pool_to_close.close()


def _forget_after_fork() -> None:
    global _lock, _pool, _users
    _lock, _pool, _users = threading.RLock(), None, 0


os.register_at_fork(after_in_child=_forget_after_fork)
