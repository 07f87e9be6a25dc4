"""The LLM service: connectors, templates, placeholder splicing, LLM + adapters, decoding."""
