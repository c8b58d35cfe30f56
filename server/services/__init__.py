"""Use cases shared by the API and the worker. No FastAPI, no Celery task code: plain functions over a Session."""
