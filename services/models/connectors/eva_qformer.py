"""EVA-ViT-g and the BLIP-2 / InstructBLIP Q-Former parts of VideoChat and E.T. Chat.

What runs where (ARCHITECTURE: encoders frozen and cached by content; everything trainable in
the LLM service's adapter bundle):

- Encoder service, frozen: `EvaVisionBackbone` (`_eva`), EVA-ViT-g cut after the block the
  seeds take, frames run independently: (B, T, 3, 224, 224) -> (B, T, 257, 1408) for VideoChat
  (CLS kept), (B, T, 256, 1408) for E.T. Chat (patches). VideoChat also needs blocks 31..38
  for its temporal layers: `forward_taps` -> (B, T, 8, 257, 1408).
- LLM service, connector (`_qformer`, `_gmhra`): everything after EVA. VideoChat's Q-Former
  and its 32 queries are frozen but cannot run in the encoder: they read the output of the
  trained Global MHRA and ln_vision, and the 64 trained extra queries self-attend with the 32
  in every Q-Former layer. E.T. Chat's Q-Former reads the user's instruction (not cacheable by
  media content) and is trained in stages 2-3. So the frozen Q-Former weights are loaded by the
  LLM service as part of the base (like the LLM) and only trained tensors go into a bundle:
  VideoChat `gmhra.*`, `ln_vision.*`, `extra_query_tokens`, `proj.*`; E.T. Chat stage 1 the
  four projections, stages 2-3 also `qformer.*`, `query_tokens`, `ln_vision.*`.

Layer rule (E.T. Chat `vision_encoder/eva_vit.py`: `depth=idx + 1 if idx >= 0 else 40 + idx + 1`,
`vision_output_layer=-2`; VideoChat/BLIP-2 `create_eva_vit_g(depth=39)`): the features are
the output of block `select_layer`, i.e. `hidden_states[eva_depth(select_layer)]` of the full
40-block tower = `hidden_states[39]` = `hidden_states[-2]`, with no final norm. Only those
39 blocks are built.

Key layout: transformers' (`Blip2VisionModel`, `Blip2QFormerModel`,
`InstructBlipQFormerModel`), so HF conversions load by prefix. An importer maps the seeds'
LAVIS-layout files like this (`{i}` a block/layer index):

    EVA (eva_vit_g.pth; VideoChat `visual_encoder.`; E.T. Chat `model.vision_tower.vision_tower.`)
      -> EvaVisionBackbone `model.`:
      cls_token, pos_embed         -> embeddings.class_embedding, embeddings.position_embedding
                                      (bicubic-resized if the grid differs, as the seeds do)
      patch_embed.proj.{weight,bias} -> embeddings.patch_embedding.*; VideoChat's inflated
                                      Conv3d weight (D, 3, 1, 14, 14) loses its time axis
      blocks.{i}.norm1/norm2       -> encoder.layers.{i}.layer_norm1/layer_norm2
      blocks.{i}.attn.qkv.weight   -> encoder.layers.{i}.self_attn.qkv.weight
      blocks.{i}.attn.q_bias, v_bias -> encoder.layers.{i}.self_attn.qkv.bias = cat(q, 0, v)
      blocks.{i}.attn.proj         -> encoder.layers.{i}.self_attn.projection
      blocks.{i}.mlp.fc1/fc2       -> encoder.layers.{i}.mlp.fc1/fc2
      blocks.{i >= 39}             -> dropped (eva_vit_g.pth has 40 blocks)
    Q-Former (BLIP-2/InstructBLIP `Qformer.bert.`; E.T. Chat `model.qformer_bert.bert.`) -> `qformer.`:
      embeddings.LayerNorm         -> layernorm (BLIP-2) / embeddings.layernorm (InstructBLIP)
      embeddings.{word,position}_embeddings -> embeddings.* (InstructBLIP only)
      encoder.layer.{i}.{attention,crossattention}.self.* -> ....{attention,crossattention}.attention.*
      everything else under encoder.layer (output, intermediate[_query], output_query) -> same
      Qformer.cls.*, qformer_bert.cls.* (LM head) -> dropped; VideoChat's Q-Former has no text
      FFN (`use_qformer_text_input=False`)
    VideoChat: query_tokens, extra_query_tokens, ln_vision.* -> same names; llama_proj.* -> proj.*;
      visual_encoder.gmhra.{j}.* -> gmhra.layers.{j}.*; visual_encoder.gmhra_cls_token -> gmhra.cls_token
    E.T. Chat: model.qformer_query -> query_tokens; model.qformer_ln -> ln_vision;
      model.qformer_{proj,q_proj,k_proj,v_proj} -> qformer_proj, q_proj, k_proj, v_proj
"""

from __future__ import annotations

from services.models.backbones.eva import EvaFeature, EvaVisionBackbone, eva_depth, eva_vit_g
from services.models.connectors.gmhra import GlobalMHRA, TemporalGMHRA
from services.models.connectors.qformer import InstructQFormerPooler, QFormerCompressor

__all__ = [
    "EvaFeature",
    "EvaVisionBackbone",
    "GlobalMHRA",
    "InstructQFormerPooler",
    "QFormerCompressor",
    "TemporalGMHRA",
    "etchat_qformer",
    "eva_depth",
    "eva_vit_g",
    "videochat_qformer",
]


def videochat_qformer(
    *,
    vision_width: int = 1408,
    out_dim: int | None = 4096,
    num_query_tokens: int = 32,
    num_extra_query_tokens: int = 64,
    width: int = 768,
    layers: int = 12,
    heads: int = 12,
    mlp_dim: int = 3072,
    cross_attention_every: int = 2,
    gmhra_layers: int = 8,
    gmhra_heads: int = 16,
    gmhra_mlp_ratio: float = 4.3637,
    gmhra_dropout: float = 0.5,
    freeze_qformer: bool = True,
) -> QFormerCompressor:
    """Build VideoChat's connector: Global MHRA + ln_vision + BLIP-2 Q-Former (32 + 64 queries) + Linear.

    Defaults are VideoChat-7B's (`out_dim` 5120 for the 13B); Q-Former dropout is 0 as in
    VideoChat. `gmhra_layers=0` leaves the temporal layers out (input: plain frame tokens).
    """
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = Blip2QFormerConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp_dim,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        cross_attention_frequency=cross_attention_every,
        encoder_hidden_size=vision_width,
        use_qformer_text_input=False,
    )
    gmhra = (
        TemporalGMHRA(
            vision_width,
            gmhra_heads,
            num_layers=gmhra_layers,
            mlp_ratio=gmhra_mlp_ratio,
            dropout=gmhra_dropout,
        )
        if gmhra_layers > 0
        else None
    )
    return QFormerCompressor(
        Blip2QFormerModel(config),
        vision_width=vision_width,
        out_dim=out_dim,
        num_query_tokens=num_query_tokens,
        num_extra_query_tokens=num_extra_query_tokens,
        gmhra=gmhra,
        freeze_qformer=freeze_qformer,
    )


def etchat_qformer(
    *,
    vision_width: int = 1408,
    out_dim: int = 3072,
    num_query_tokens: int = 32,
    width: int = 768,
    layers: int = 12,
    heads: int = 12,
    mlp_dim: int = 3072,
    cross_attention_every: int = 2,
    vocab_size: int = 30523,
    max_text_positions: int = 512,
    dropout: float = 0.1,
    freeze_qformer: bool = True,
) -> InstructQFormerPooler:
    """Build E.T. Chat's frame compressor: InstructBLIP Q-Former + attention pooling, 1 token/frame.

    Defaults are E.T. Chat's: BERT-base with `[DEC]` added (30523 ids), its dropout 0.1,
    `out_dim` 3072 for Phi-3-mini; `freeze_qformer` as in stage 1.
    """
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    config = InstructBlipQFormerConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp_dim,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=max_text_positions,
        cross_attention_frequency=cross_attention_every,
        encoder_hidden_size=vision_width,
    )
    return InstructQFormerPooler(
        InstructBlipQFormerModel(config),
        vision_width=vision_width,
        out_dim=out_dim,
        num_query_tokens=num_query_tokens,
        freeze_qformer=freeze_qformer,
    )
