"""Everything that talks to PostgreSQL servers with psycopg."""
