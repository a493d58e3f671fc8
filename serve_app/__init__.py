"""The Serve ingress: auth, validation, routing to shards, the HTTP contract of API.md."""
