"""Configuration: its schema (schema.py) and how it is read (loading.py)."""
