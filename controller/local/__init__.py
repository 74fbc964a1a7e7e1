"""pgbosh local."""
