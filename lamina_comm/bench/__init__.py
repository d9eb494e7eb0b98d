"""lamina-bench: bandwidth, latency, pipeline and plan subcommands."""
