"""Offline work on a trained or base policy: benchmark evaluation, tool-use data selection, the loaders of
benchmark files and the reporting both share."""
