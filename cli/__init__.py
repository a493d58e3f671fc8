"""The `metergate` command line: the service started here, and operated over its HTTP API."""
