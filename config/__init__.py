"""Settings (METERGATE_* environment variables) and the plan/tier catalog."""
