"""Tasks and the files they come from: the one place a task is defined, read, written, checked and mixed.

``tasks`` (the Task record, TaskError and BadRow, the TaskSource protocol), ``deepeyes_rows`` (one DeepEyes
row to a Task and back, and whether it is fit to train on), ``fields`` (the checked field reads both readers
share), ``parquet`` (the writer and the lazy parquet source), ``hf`` (Hugging Face datasets), ``check``
(``python -m deepeyes_envs.data.check FILE``) and ``mixing`` (agentic and plain rows side by side).

Import from the modules themselves: this package imports nothing, so that ``registry`` (which the row
parser needs) can import ``data.tasks`` without a cycle.
"""
