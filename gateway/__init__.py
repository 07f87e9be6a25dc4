"""The gateway: OpenAI-compatible REST API and gRPC Chat API in front of the services.

Public API (import from the modules):
    serving.ChatService      transport-independent chat logic (validate, media, cache, LLM)
    http_app.create_app      the FastAPI app: /v1/chat/completions, /v1/models, /health, /metrics
    grpc_chat.ChatServicer   modalmesh.v1.Chat/Complete over the same ChatService
    python -m gateway        runs both servers in one event loop (see __main__)

Modules:
    protocol       OpenAI request/response/chunk models (vLLM's shapes)
    domain         the transport-independent request and event types
    media          data: and http(s) media loading with deadline and byte cap
    feature_cache  encoder features in Redis, keyed by content
    llm_client     the LLM service's gRPC client
    metrics        Prometheus metrics on a registry per service
"""
