"""Task modules used only by the benchmarks (importable as ``bench.tasks.<name>``)."""
