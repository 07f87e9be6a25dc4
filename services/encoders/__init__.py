"""The encoder service: media decoding and preprocessing, frozen backbones, Triton bindings.

Library (no grpc or PyTriton imports; the trainer uses these):
    preprocess  decode_image, ClipImagePreprocessor (CLIPImageProcessor parity, PIL + numpy)
    backbones   Backbone, ClipVisionBackbone, BACKBONES registry, build_backbone(spec)
    model       ImageEncoder: bytes -> per-item float32 (tokens, dim) features or error
    protocol    the Triton models' tensor names (media -> features, error)

Server and client:
    triton      binds each modality's ImageEncoder as a PyTriton model; EncoderServer
    __main__    `python -m services.encoders` (ports and preset from MODALMESH_* / flags)
    client      EncoderClient (tritonclient.grpc.aio) used by the gateway

Import from the modules directly; this package imports nothing so that a client does not pull
in torch.
"""
