"""An example application that keeps its sessions in its own PostgreSQL database."""
