"""Names of the encoder models' tensors, shared by the Triton binding and the client.

Per item along the batch dimension:

    input   media     BYTES  (1,)            the compressed file (PNG, JPEG, ...)
    output  features  FP32   (tokens, dim)   the backbone's tokens; zeros where `error` is set
    output  error     BYTES  (1,)            empty for a good item, else why it was refused

Kept free of heavy imports so that clients (the gateway) need neither torch nor PyTriton.
"""

from __future__ import annotations

MEDIA_INPUT = "media"
FEATURES_OUTPUT = "features"
ERROR_OUTPUT = "error"
