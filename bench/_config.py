"""How much each benchmark does: `--quick` (a few minutes on a 2-core CPU) or the full run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repetitions of one run.

    Attributes:
        concurrency: Concurrent image chats of the throughput benchmark.
        requests_per_client: Chats each concurrent client sends (closed loop) per round.
        rounds: Rounds per throughput level and TTFT probe set, modalmesh and baseline alternating.
        max_tokens: Completion tokens per throughput chat.
        long_tokens: Completion tokens of each of the 8 long generations of the TTFT benchmark.
        ttft_probes: New requests timed under load (one per round of 8 long generations).
        cache_requests: Chats timed with the image cached and with a fresh image.
        encoder_images: Images sent per encoder concurrency level.
        decoder_images: Images generated per decoder concurrency level.
        decoder_seed_calls: Images generated the seed's way (pipeline loaded per call).
        transport_reps: Timed transfers per tensor size.
        warmup: Untimed requests before each measurement.
    """

    concurrency: tuple[int, ...] = (1, 4, 16)
    requests_per_client: int = 4
    rounds: int = 3
    max_tokens: int = 64
    long_tokens: int = 512
    ttft_probes: int = 3
    cache_requests: int = 40
    encoder_images: int = 256
    decoder_images: int = 64
    decoder_seed_calls: int = 5
    transport_reps: int = 30
    warmup: int = 3

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            requests_per_client=3,
            rounds=2,
            max_tokens=32,
            long_tokens=256,
            ttft_probes=1,
            cache_requests=20,
            encoder_images=128,
            decoder_images=32,
            decoder_seed_calls=3,
            transport_reps=30,
            warmup=2,
        )
