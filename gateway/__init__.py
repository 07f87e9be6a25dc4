"""The gateway: OpenAI-compatible REST API and gRPC Chat API in front of the services."""
