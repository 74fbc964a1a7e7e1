"""pgbosh operator."""
