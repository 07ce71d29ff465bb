"""The catalogue of known published deltas (`index.json`), installed as `sftstore_registry`."""
