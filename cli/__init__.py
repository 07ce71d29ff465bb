"""The `sft` command line application (installed as the `sftstore_cli` package)."""
