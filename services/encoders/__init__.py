"""The encoder service: media decoding and preprocessing, frozen backbones, Triton bindings.

Library (no grpc or PyTriton imports; the trainer uses these):
    preprocess  decode_image, ClipImagePreprocessor (CLIPImageProcessor parity, PIL + numpy)
    video       decode_video with limits (decord via a private temp file), frame sampling rules
                of VideoChat (N frames), E.T. Chat (fps with a cap) and ImageBind (clips)
    audio       decode_audio (wav/flac/ogg/mp3 via libsndfile), resample to 16 kHz, ImageBind
                clips and its 128x204 Kaldi-style fbank (_fbank), no torchaudio
    imagebind   ImageBind-compatible vision/audio towers that load imagebind_huge strictly
    eva_qformer EVA-ViT-g with the seeds' layer choice (_eva), VideoChat's Global MHRA (_gmhra)
                and Q-Former compressors of VideoChat and E.T. Chat (_qformer); the trained
                halves are connectors and move to the LLM service when presets use them
    events      parse_events (.npy pickled dict through an allow-list unpickler (_safe_npy),
                structured/(N, 4) .npy, .npz), EventGPT's red/blue event frames
    backbones   Backbone, ClipVisionBackbone, BACKBONES registry (clip_vision, eva_vit,
                imagebind), build_backbone(spec, modalities=..., device=...)
    prepare     MediaPreprocessor (every modality: bytes -> the backbone's input and frame
                times, by the spec's sampling and preprocess rules: crop rounding, squash,
                torch resize, transparency, event colours), EncoderLimits.from_settings
    media       MediaEncoder (MediaPreprocessor -> backbone -> EncodedItem features + frame
                times)
    tiny_weights write_tiny_backbone(spec, folder, seed=...): random checkpoints for tiny twins
    protocol    the Triton models' tensor names (media -> features, times, error), EncodedItem

Server and client:
    triton      load_encoders (shared backbones), binds each modality's MediaEncoder as a
                PyTriton model; EncoderServer
    __main__    `python -m services.encoders` (ports and preset from MODALMESH_* / flags)
    client      EncoderClient (tritonclient.grpc.aio) used by the gateway

Import from the modules directly; this package imports nothing so that a client does not pull
in torch.
"""
