"""The director's tunables, importable without the server's dependencies (the CLI index reads them)."""

DEFAULT_RESURRECTION_DELAY = 2.0  # seconds an agent must be unresponsive before its VM is recreated
DEFAULT_AGENT_TIMEOUT = 3.0  # seconds without an answer from a live agent before it is "unresponsive agent"
DEFAULT_POLL_INTERVAL = 0.5  # supervision loop period
DEFAULT_RUN_AS = "postgres"  # OS user of the database processes when the director runs as root
# Instances the director creates or deletes at once in one task: the Director's
# `director.max_threads` (jobs/director/spec, default 32), which its VmCreator and
# InstanceDeleter give their thread pools.
DEFAULT_MAX_THREADS = 32
