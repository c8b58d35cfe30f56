"""Celery worker: the app factory, per-process setup, thin tasks, and the search runner."""
