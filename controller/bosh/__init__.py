"""The BOSH side: the Director client, the manifest builder and the shapes they share."""
