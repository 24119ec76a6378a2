"""Persistence: SQLAlchemy 2 models, engine, repositories."""
