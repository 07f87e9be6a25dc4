"""The encoder service: each preset modality's MediaEncoder (from `services.models.media`)
served as a PyTriton model.

    protocol    the Triton models' tensor names (media -> features, times, error)
    triton      load_encoders (shared backbones), binds each modality's MediaEncoder as a
                PyTriton model; EncoderServer (a `services.common.triton_service.TritonServer`)
    __main__    `python -m services.encoders` (ports and preset from MODALMESH_* / flags): one
                `TritonService` record
    client      EncoderClient (tritonclient.grpc.aio) used by the gateway

Import from the modules directly; this package imports nothing so that a client does not pull
in torch.
"""
