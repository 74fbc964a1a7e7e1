"""pgbosh reconcile."""
