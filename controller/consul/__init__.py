"""Publishing a cluster's primary and replicas in Consul."""
