"""Adapters: the I/O edges of the service (Meta Graph API, CRMs, database)."""
