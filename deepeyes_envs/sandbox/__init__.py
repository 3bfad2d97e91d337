"""A sandbox for model-written Python: warm workers in Linux namespaces, with limits on everything.

``SandboxPool.run(code, images)`` runs the code in a fresh process forked from a warm worker, with no
network, no host files, no capabilities, a seccomp deny-list and bounded CPU, wall time, memory,
processes, files and output, and returns an ``ExecutionResult``. The threat model is in docs/code-tool.md.
"""

from .limits import ALLOWED_IMPORTS, DEFAULT_LIMITS, Limits
from .pool import SandboxPool, SandboxUnavailable
from .results import ExecutionResult

__all__ = ["ALLOWED_IMPORTS", "DEFAULT_LIMITS", "ExecutionResult", "Limits", "SandboxPool", "SandboxUnavailable"]
