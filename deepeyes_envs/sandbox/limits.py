"""What one execution may use, and what it may import (imported by the env, and by the worker as ``limits``).

Every limit is enforced where the code cannot reach it: resource limits set in the execution's
process before the code starts (CPU, memory, processes, open files, file size), a tmpfs of bounded
size for scratch files, and the worker and the env cutting off time, printed text and images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Modules an honest program may import. The list is a convenience, not a boundary (docs/code-tool.md).
ALLOWED_IMPORTS = ("numpy", "PIL", "math", "statistics", "random", "collections", "itertools", "functools",
                   "operator", "re", "json", "string", "heapq", "bisect", "fractions", "colorsys")
# Loaded by the warm worker before the host's files disappear from its view: nothing else can be imported.
PRELOADED_MODULES = (*ALLOWED_IMPORTS, "numpy.fft", "numpy.linalg", "numpy.random", "numpy.polynomial",
                     *(f"PIL.{m}" for m in ("Image", "ImageChops", "ImageColor", "ImageDraw", "ImageEnhance",
                                            "ImageFilter", "ImageFont", "ImageMath", "ImageOps", "ImageStat")))


@dataclass(frozen=True)
class Limits:
    """Per-execution limits; each, when hit, ends the execution with an error that names it."""

    cpu_s: float = 5.0  # CPU seconds (RLIMIT_CPU, whole seconds, rounded up)
    wall_s: float = 10.0  # wall-clock seconds, enforced by the worker
    memory_mb: int = 1024  # address space, interpreter and images included (RLIMIT_AS)
    max_tasks: int = 8  # processes and threads together, the execution's own included (RLIMIT_NPROC)
    max_open_files: int = 32  # file descriptors (RLIMIT_NOFILE); also the scratch tmpfs's file count
    max_file_mb: int = 16  # the largest file the code may write (RLIMIT_FSIZE)
    scratch_mb: int = 32  # size of the writable /scratch tmpfs
    max_output_bytes: int = 16_384  # printed text (stdout and stderr together)
    max_images: int = 4  # images the code may show()
    max_image_pixels: int = 4096 * 4096  # pixels of each shown image
    max_input_mb: int = 256  # the images sent into the sandbox for one execution

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"sandbox limit {field.name} must be a positive number, got {value!r}")
            if field.type == "int" and not isinstance(value, int):
                raise ValueError(f"sandbox limit {field.name} must be an integer, got {value!r}")

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_LIMITS = Limits()
