"""pgbosh node."""
