"""The LLM service: connectors, templates, placeholder splicing, LLM + adapters, decoding.

Library modules (no grpc imports; the trainer may import them):
    domain      requests, events and model info; the GenerationEngine interface
    templates   conversation templates and rendering turns into segments
    prompt      segments -> token ids with media placeholders expanded, and their spans
    connectors  encoder features -> LLM embeddings (one builder per connector type)
    adapters    adapter bundles: write, load, verify
    lora        LoRA bundles at serving: checks against the LM, PEFT multi-adapter on one LM
    adapter_manager  loaded adapter versions, the current pointer, eviction, on-demand pins
    adapter_sync     following the adapter registry in Redis (start-up catch-up, events)
    model       MultimodalLM: connectors + causal LM; embedding with features scattered in
    loading     a preset -> tokenizer, LM, bundle, connectors (the one loading path)
    sampling    sampling parameters and next-token selection
    detokenize  incremental detokenization and stop strings
    engine      Engine: validation, KV-cached decode loop on a worker thread, streaming

Server (grpc):
    servicer    modalmesh.v1.LLM over an engine (proto <-> domain)
    server      wiring and running the gRPC server
    __main__    `python -m services.llm [--preset NAME] [--host H] [--port N]`
"""
