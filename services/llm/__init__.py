"""The LLM service: the served MultimodalLM (from `services.models`) with its adapters, batched
decoding and streaming over gRPC.

Library modules (no grpc imports):
    domain      requests, events and model info; the GenerationEngine interface
    adapter_manager  loaded adapter versions, the current pointer, eviction, on-demand pins
    adapter_sync     following the adapter registry in Redis (start-up catch-up, events)
    sampling    sampling parameters and next-token selection
    detokenize  incremental detokenization and stop strings
    signals     NExT-GPT's signal tokens -> output projector conditioning
    batching    the continuous batch's KV cache and step
    engine      Engine: validation, continuous batching on a worker thread, streaming

Server (grpc):
    servicer    modalmesh.v1.LLM over an engine (proto <-> domain)
    server      wiring and running the gRPC server
    __main__    `python -m services.llm [--preset NAME] [--host H] [--port N]`
"""
