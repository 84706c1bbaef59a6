"""The ``incus`` backend: the same instances on an Incus server or cluster, over its REST API."""
