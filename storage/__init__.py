"""Postgres: embedded server, migrations, and the batched reads and writes of the shards."""
