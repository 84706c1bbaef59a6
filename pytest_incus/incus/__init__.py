"""The ``incus`` backend: instances on an Incus server or cluster, over its REST API."""
