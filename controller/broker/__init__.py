"""pgbosh broker."""
