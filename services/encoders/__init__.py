"""The encoder service: media decoding and preprocessing, frozen backbones, Triton bindings."""
