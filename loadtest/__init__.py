"""Load tests that drive a running tandem cluster over gRPC (`tandem loadtest`, `python -m loadtest`).

scenario (YAML) -> prompts (RequestSpec, offline tokenization) -> client (asyncio + grpc.aio, RequestRecord)
-> metrics (vLLM's summary keys, goodput) -> report (result.json, summary.md) and plots (PNGs); sweep raises the
rate until goodput falls. Nothing here imports the router or the engine.
"""
