"""A FastAPI application whose sessions live in its own PostgreSQL database."""
