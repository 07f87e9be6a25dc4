"""Cross-service helpers: settings, errors and their status mapping, gRPC and Triton server
bootstrap, process handling, health probes, tensor codec, logging and presets.

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
    procenv       child processes: their environment, process groups, waiting for a stop signal
    health        `python -m services.common.health`: the HTTP and gRPC health probes
    triton_env    libpython for Triton's stub, Triton's server settings
    triton_service  the Triton services' shell (CLI, serve loop, server base, model binding)

The bottom layer: it imports no service and not the model library (tests/unit/test_layout.py).
"""
