"""Names of the encoder models' tensors, and the per-item result, shared by the Triton binding
and the client.

Per request (one or more items along the batch dimension), per item:

    input   media     BYTES  (1,)         the compressed file (image, video, audio or event file)
    output  features  FP32   (rows, dim)  frame-major: frames * tokens_per_frame rows (ImageBind:
                                          one row); zeros where `error` is set
    output  times     FP32   (frames,)    seconds of each frame in the source (an image: [0.0])
    output  error     BYTES  (1,)         empty for a good item, else why it was refused

Rows and frames vary per item (fps sampling). A request carrying several items whose frame
counts differ is padded to its longest item: features with zero rows, times with NaN; an
item's own frames are the leading non-NaN entries of its times (`EncoderClient` sends one item
per request and trims any padding).

Kept free of heavy imports so that clients (the gateway) need neither torch nor PyTriton.
"""

from __future__ import annotations

MEDIA_INPUT = "media"
FEATURES_OUTPUT = "features"
TIMES_OUTPUT = "times"
ERROR_OUTPUT = "error"
