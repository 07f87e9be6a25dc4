"""Diffusion decoders of the any-to-any presets (NExT-GPT).

- `pipelines`: diffusers pipelines loaded once, requests validated against their limits and
  conditioning shapes, single and batched decoding;
- `media_out`: the generated media encoded to PNG, WAV, MP4 or GIF;
- `params`: decoding parameters checked against a decoder's limits (shared with the gateway);
- `triton`, `server`, `__main__`: the decoder service (one Triton model per output modality);
- `client`: `DecoderClient`, what the gateway calls (no torch needed);
- `embed`: the decoders' text-encoder conditioning of captions (`modalmesh embed-captions`);
- `tiny`: the tiny random-weight pipeline folders of the tiny twins and tests.

Nothing is imported here, so a client of the service does not load torch or diffusers.
"""
