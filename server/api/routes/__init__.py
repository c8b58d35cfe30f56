"""API routes: thin handlers over ``server.services``."""
