"""modalmesh's benchmarks against a seed-style server, run together: `python -m bench`.

Each benchmark is a function in its own module that takes the running `Stack` and a
`Settings` and returns its `Figure`s (value, baseline measured in the same run, ratio):
`chat` (throughput and latency at 1/4/16 concurrent image chats; time to first token under
load; cached vs fresh image), `encoder` (images/s at 1 vs 32 concurrent requests),
`decoder` (generated images/s at 1 vs 8 concurrent requests; the service vs loading the
pipeline per call as legacy NExT-GPT does), `ceiling` (what batching can gain on this machine)
and `transport` (feature bytes over gRPC vs an in-process copy). `baseline_server` is the
LLaVA-style server they are compared with.
"""

from bench._report import Figure

__all__ = ["Figure"]
