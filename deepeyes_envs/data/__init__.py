"""Tasks and the files they come from: the one place a task is defined, read, written, checked and mixed.

``tasks`` (the Task record and the TaskSource protocol), ``mixing`` (agentic and plain rows in one source).
Import from the modules themselves: this package imports nothing, so that ``registry`` (which the row
parser needs) can import ``data.tasks`` without a cycle.
"""
