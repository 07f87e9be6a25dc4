"""Cross-service helpers: settings, errors and their status mapping, gRPC server bootstrap,
tensor codec, logging and presets.

Modules (import from them directly):
    errors        the exception family; HTTP status and OpenAI error bodies (no grpc import)
    grpc_errors   modalmesh errors <-> gRPC status codes
    grpc_server   gRPC server with health, reflection, raised limits, graceful drain
    settings      typed MODALMESH_* settings
    tensor_codec  Tensor messages <-> numpy / torch
    log           JSON logging with the request id
    presets       the preset schema and loader
    adapter_registry  adapter versions, current pointers and events in Redis (no torch)
    content       roles, turns and their parts, encoded media features, timestamps
    decode_params decoding parameters of the output modalities and their checks
"""
