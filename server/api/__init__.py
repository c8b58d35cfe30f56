"""The HTTP API (the only FastAPI code). ``create_app()`` builds it; nothing is created at import time."""
