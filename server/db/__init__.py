"""Database layer: declarative base with a naming convention, typed models, engine/session factories."""
