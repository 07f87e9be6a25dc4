"""Names of the decoder models' tensors, and the decoded item, shared by the Triton binding and
the client.

One Triton model per output modality (`preset.decoder_model(modality)`, e.g. "image_decoder"),
with dynamic batching. Per item along the batch dimension:

    input   prompt_embeds  FP32   (rows, width)  the conditioning (the output projector's output):
                                                 (77, 768) for SD 1.5, (1, 512) for AudioLDM
    input   params         BYTES  (1,)           a UTF-8 JSON object of decoding parameters
                                                 (`PARAM_FIELDS`, all optional; `{}` = defaults)
    output  media          BYTES  (1,)           the encoded file (PNG, WAV, MP4 or GIF); empty
                                                 where `error` is set
    output  mime_type      BYTES  (1,)           e.g. "image/png"; empty where `error` is set
    output  seed           INT64  (1,)           the seed the item was generated with; -1 on error
    output  error          BYTES  (1,)           empty for a good item, else why it was refused

Kept free of heavy imports so that clients (the gateway) need neither torch nor PyTriton.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.decode_params import FIELDS

EMBEDS_INPUT = "prompt_embeds"
PARAMS_INPUT = "params"
MEDIA_OUTPUT = "media"
MIME_OUTPUT = "mime_type"
SEED_OUTPUT = "seed"
ERROR_OUTPUT = "error"
OUTPUTS = (MEDIA_OUTPUT, MIME_OUTPUT, SEED_OUTPUT, ERROR_OUTPUT)

# The keys `params` may hold: the fields of `pipelines.DecodeParams`, and `format` (one of the
# modality's media formats: png; wav; mp4 or gif) over the preset's choice.
PARAM_FIELDS = (*FIELDS, "format")
NO_SEED = -1


@dataclass
class DecodedMedia:
    """One generated item as a file.

    Attributes:
        data: The file's bytes.
        mime_type: Its MIME type ("image/png", "audio/wav", "video/mp4", "image/gif").
        seed: The seed it was generated with (give it back to generate it again).
    """

    data: bytes
    mime_type: str
    seed: int
