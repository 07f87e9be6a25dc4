"""Tiny random-weight diffusers pipeline folders for the tiny twins and the tests.

Each writer builds, from small configs and a fixed seed, the same components as the real
decoder of NExT-GPT (SEEDS_SPEC section 2) and saves them with `save_pretrained`, so the folder
loads with the same `from_pretrained` call as a real checkpoint:

- image: `StableDiffusionPipeline` (UNet2DConditionModel, AutoencoderKL with the SD latent
  geometry (4 channels, 8x down), CLIPTextModel, a CLIP tokenizer, DDIM; no safety checker);
- audio: `AudioLDMPipeline` (UNet2DConditionModel conditioned through its class embedding
  (`simple_projection`, no cross-attention input), AutoencoderKL on mel spectrograms,
  ClapTextModelWithProjection, a RoBERTa tokenizer, SpeechT5HifiGan at 16 kHz / hop 160);
- video: `TextToVideoSDPipeline` (UNet3DConditionModel, AutoencoderKL, CLIPTextModel).

The tokenizers are built here (byte-level vocabularies without merges), so nothing is
downloaded. The conditioning sizes differ per modality (`TINY_CONDITIONING`) so that a tensor
sent to the wrong decoder fails validation, as a 77x768 one would on ZeroScope's 77x1024.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from services.common import modalities
from services.common.errors import InvalidArgumentError

SEED = 1234
TOKENS = 77  # CLIP's context, as in SD 1.5 and ZeroScope
# Per-item conditioning shape of each tiny decoder (real: (77, 768), (1, 512), (77, 1024)).
TINY_CONDITIONING: dict[str, tuple[int, int]] = {
    "image": (TOKENS, 32),
    "audio": (1, 16),
    "video": (TOKENS, 48),
}

_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
# Sizes every tiny UNet shares (4 latent channels, two blocks of width 16 and 32).
_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies hold)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _write_bpe_files(folder: Path, vocab: dict[str, int], config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, sort_keys=True))


def write_clip_tokenizer(folder: Path) -> int:
    """A CLIP tokenizer over single bytes (each with and without CLIP's `</w>` word end).

    Returns:
        The vocabulary size.
    """
    chars = _byte_alphabet()
    names = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab = {name: i for i, name in enumerate(names)}
    _write_bpe_files(
        folder,
        vocab,
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": TOKENS,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        },
    )
    return len(vocab)


def write_roberta_tokenizer(folder: Path) -> int:
    """A RoBERTa (CLAP) tokenizer over single bytes; returns the vocabulary size."""
    names = ["<s>", "<pad>", "</s>", "<unk>", *_byte_alphabet(), "<mask>"]
    vocab = {name: i for i, name in enumerate(names)}
    _write_bpe_files(
        folder,
        vocab,
        {
            "tokenizer_class": "RobertaTokenizer",
            "model_max_length": TOKENS,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "cls_token": "<s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "<mask>",
        },
    )
    return len(vocab)


def _vae(in_channels: int, blocks: int, width: int = 8) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=[width] * blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _clip_text(folder: Path, hidden: int) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_clip_tokenizer(folder / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tokenizer")
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden,
    )
    return CLIPTextModel(config), tokenizer


def _save(pipe: Any, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    return folder


def write_tiny_sd(folder: Path, seed: int = SEED) -> Path:
    """An SD-1.5-shaped `StableDiffusionPipeline` folder; conditioning (77, 32), 64 px default."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    hidden = TINY_CONDITIONING["image"][1]
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder, tokenizer = _clip_text(Path(tmp), hidden)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        **_UNET,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(3, blocks=4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, folder)


def write_tiny_audioldm(folder: Path, seed: int = SEED) -> Path:
    """An `AudioLDMPipeline` folder: CLAP text embeds (1, 16) as the UNet's class embedding."""
    from diffusers import AudioLDMPipeline, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        RobertaTokenizer,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    torch.manual_seed(seed)
    dim = TINY_CONDITIONING["audio"][1]
    mel_bins = 16
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_roberta_tokenizer(Path(tmp))
        tokenizer = RobertaTokenizer.from_pretrained(tmp)
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKENS + 3,
            projection_dim=dim,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **_UNET,
        # AudioLDM: the text embedding enters as a class embedding concatenated to the time
        # embedding; the cross-attention layers attend to nothing (encoder_hidden_states=None).
        cross_attention_dim=(16, 32),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=dim,
        class_embeddings_concat=True,
    )
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=mel_bins,
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=[4, 4, 10],  # hop 160 at 16 kHz, as AudioLDM's
            upsample_kernel_sizes=[8, 8, 20],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
        )
    )
    pipe = AudioLDMPipeline(
        vae=_vae(1, blocks=3),  # (1, frames, 16 mel bins) -> latents (4, frames / 4, 4)
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
        vocoder=vocoder,
    )
    return _save(pipe, folder)


def write_tiny_text_to_video(folder: Path, seed: int = SEED) -> Path:
    """A `TextToVideoSDPipeline` (ZeroScope-shaped) folder; conditioning (77, 48)."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    hidden = TINY_CONDITIONING["video"][1]
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder, tokenizer = _clip_text(Path(tmp), hidden)
    unet = UNet3DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        **_UNET,
    )
    pipe = TextToVideoSDPipeline(
        vae=_vae(3, blocks=4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
    )
    return _save(pipe, folder)


# By diffusers class: an output modality's tiny decoder is that of the pipeline its registry
# record names (`output.pipeline`).
WRITERS = {
    "StableDiffusionPipeline": write_tiny_sd,
    "AudioLDMPipeline": write_tiny_audioldm,
    "TextToVideoSDPipeline": write_tiny_text_to_video,
}


def write_tiny_decoder(kind: str, folder: Path, seed: int = SEED) -> Path:
    """Write the tiny pipeline of output modality `kind` ("image", "audio", "video") into `folder`."""
    output = modalities.get(kind).output
    if output is None:
        raise InvalidArgumentError(f"tiny decoder: {kind} is not an output modality")
    return WRITERS[output.pipeline](folder, seed)
