"""Alembic migrations for prunehub's database. ``server.db.migrate`` runs them programmatically."""
