"""pgbosh api."""
