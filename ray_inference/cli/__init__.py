"""The `rayinfer` command line: a thin HTTP client of the gateway, plus the node entry points.

Asking the cluster needs only httpx; Ray and torch are imported by `rayinfer head`/`worker`
alone, so the client starts fast and runs on machines without them.
"""
