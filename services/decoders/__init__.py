"""Diffusion decoders of the any-to-any presets (NExT-GPT), served through PyTriton.

- `triton`, `server`, `__main__`: the decoder service (one Triton model per output modality)
  over the pipelines of `services.models.decoders`, on the Triton service shell shared with
  the encoders (`services.common.triton_service`);
- `media_out`: the generated media encoded to PNG, WAV, MP4 or GIF;
- `protocol`: the Triton models' tensor names;
- `client`: `DecoderClient`, what the gateway calls (no torch needed).

Decoding parameters and their checks live in `services.common.decode_params` (shared with the
gateway). Nothing is imported here, so a client of the service does not load torch or diffusers.
"""
