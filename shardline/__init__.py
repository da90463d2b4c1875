"""shardline: one LLM across several machines, all cluster state in Temporal."""
