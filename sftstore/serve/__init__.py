"""`sft serve`: one resident base model answers every (task, language) pair over HTTP, hot-swapping deltas.

An optional extra (`pip install "sftstore[serve]"`: FastAPI, uvicorn, prometheus-client). The modules,
bottom up: `cache` (validated deltas on the device, bounded by bytes), `engine` (the resident model:
one encoder, a head per task, the composition of the resident pair), `pairs` (requests' refs to stored
versions), `scheduler` (per-pair queues and the one model worker), `metrics`, `app` (the HTTP API) and
`runner` (start, serve, stop gracefully).
"""
