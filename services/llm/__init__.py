"""The LLM service: the served MultimodalLM (from `services.models`) with its adapters, batched
decoding and streaming over gRPC.

Library modules (no grpc imports):
    domain      requests, events and model info; the GenerationEngine interface
    adapter_manager  loaded adapter versions, the current pointer, eviction, on-demand pins
    adapter_sync     following the adapter registry in Redis (start-up catch-up, events)
    sampling    sampling parameters and next-token selection
    detokenize  incremental detokenization and stop strings
    signals     NExT-GPT's signal tokens -> output projector conditioning
    batching    a running batch's left-padded KV cache
    request     PreparedRequest: a validated request with its prompt
    scheduler   queues, admission, the running batches, limits, cancellation (no torch)
    runner      prefill, the batched decode step, sampling, time-token and signal capture
    stream      sampled tokens -> GenerationEvents, the per-request queue to the consumer
    engine      Engine: validation and prompt, the worker-thread loop over the three above

Server (grpc):
    servicer    modalmesh.v1.LLM over an engine (proto <-> domain)
    server      wiring and running the gRPC server
    __main__    `python -m services.llm [--preset NAME] [--host H] [--port N]`
"""
