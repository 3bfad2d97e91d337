"""Every bad row of a DeepEyes parquet file, found before a run starts: ``python -m deepeyes_envs.data.check FILE``.

A run skips bad rows and lists them, and stops once too many are bad; this reads whole files as training
would, so a broken file is fixed before it costs a run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Iterator, Sequence
from typing import Optional

from ..images import MAX_DECODED_PIXELS
from .deepeyes_rows import validate_deepeyes_row
from .parquet import ParquetTaskSource
from .tasks import BadRow, PathLike, Task, TaskError


def check_deepeyes_parquet(
    path: PathLike,
    *,
    image_root: Optional[PathLike] = None,
    env_names: Optional[Collection[str]] = None,
    decode_images: bool = True,
    max_image_pixels: int = MAX_DECODED_PIXELS,
) -> Iterator[Task | BadRow]:
    """:func:`validate_deepeyes_row` over a whole file, streamed: one result per row, in file order.

    Only one batch of compressed rows and one decoded image are held at a time, so a 47k-row file of
    4K images is checked in bounded memory. The rows of a row group that cannot be read are bad rows
    (field ``"row"``); a file that cannot be opened, or is not a DeepEyes parquet file, raises TaskError.
    """
    source = ParquetTaskSource(path, image_root=image_root)
    for index, row in source.rows():
        if isinstance(row, TaskError):
            yield BadRow.from_error(row)
            continue
        yield validate_deepeyes_row(row, index, image_root=source.image_root, source=source.path,
                                    env_names=env_names, decode_images=decode_images,
                                    max_image_pixels=max_image_pixels)


def report(args: argparse.Namespace) -> int:
    """Print every bad row of every file, then a summary per file; 1 when any row is bad, 2 when a file
    cannot be read at all."""
    status = 0
    for path in args.files:
        n_rows = n_bad = 0
        try:
            for result in check_deepeyes_parquet(path, image_root=args.image_root, decode_images=not args.no_decode,
                                                 max_image_pixels=args.max_image_pixels):
                n_rows += 1
                if isinstance(result, BadRow):
                    n_bad += 1
                    reason = result.reason.removeprefix(f"row {result.index}: ")
                    print(f"{path}: row {result.index} [{result.field or 'row'}]: {reason}")
        except TaskError as exc:
            print(f"{path}: cannot check: {exc}", file=sys.stderr)
            status = 2
            continue
        share = 100.0 * n_bad / n_rows if n_rows else 0.0
        print(f"{path}: {n_rows} rows, {n_bad} bad ({share:.2f}%)")
        if n_bad and status == 0:
            status = 1
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepeyes_envs.data.check",
                                     description="Read every row of DeepEyes parquet files as training would "
                                     "(fields, env_name, <image> count, and each image decoded, one at a time) and "
                                     "print each bad row with its index and reason, then a summary. Exit status: "
                                     "0 clean, 1 bad rows, 2 unreadable file.")
    parser.add_argument("files", nargs="+", help="DeepEyes parquet file(s)")
    parser.add_argument("--image-root", help="directory that relative image paths are resolved against")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_DECODED_PIXELS,
                        help=f"refuse images with more pixels, as the env does (default {MAX_DECODED_PIXELS})")
    parser.add_argument("--no-decode", action="store_true", help="check the fields only, decode no image")
    return report(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
