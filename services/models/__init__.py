"""The model library: every nn.Module of modalmesh, its builder and its checkpoint loader, and
what turns a request's media and text into model inputs. The encoder, LLM, decoder and trainer
services import it; it imports only `services.common` (never a service).

Subpackages (import from the modules directly; nothing is imported here, so a service pulls in
only what it uses):
    media        bytes -> model input: decode_image/video/audio/events with limits, the seeds'
                 preprocessing (CLIP, ImageBind clips + fbank, EVA, event frames), the
                 MediaPreprocessor of every modality, and MediaEncoder (preprocessing + backbone)
    backbones    frozen encoders: Backbone and build_backbone (clip_vision, eva_vit, imagebind),
                 ImageBind's towers, EVA-ViT-g, their strict checkpoint loaders, tiny writers
    connectors   features -> LLM embeddings: linear/MLP projectors, VideoChat's Global MHRA +
                 Q-Former, E.T. Chat's instruction-aware Q-Former, bundle state
    lm           the language side: MultimodalLM (connectors + causal LM), the one model that
                 serves and, as `training.TrainingModel` with its losses, trains; attention
                 modes, LoRA checks and injection, what trains (`training_params`), tokenizer
                 and added tokens, the seeds' LLM configs, output projectors (NExT-GPT) and
                 their training loss, timestamp heads (E.T. Chat), `loading` (a preset -> the
                 served model, the one loading path), tiny writers
    prompt       conversation templates and the prompt builder (turns -> token ids with media
                 placeholders expanded); the trainer renders training samples with the same code
    checkpoints  the adapter bundle format, reading seed checkpoint files, and `modalmesh import`
    decoders     diffusers pipelines (NExT-GPT's image/audio/video decoders), caption embedding
                 for stage-2 targets, tiny pipeline writers
    tiny         the tiny built-in models of every tiny preset, generated on first use
"""
