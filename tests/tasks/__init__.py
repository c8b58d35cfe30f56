"""Task modules used by the tests (entrypoints under the ``tests.`` prefix)."""
