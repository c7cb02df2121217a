"""An aiogram form bot keeping its dialogue state in PostgreSQL through sessions_sql."""
