"""Evaluation: scoring model replies against benchmark ground truth, and running benchmarks.

`metrics` holds the scorers (temporal IoU, Charades-STA grounding, E.T. Bench's tasks,
MVBench and LLaVA-style multiple choice, reference answers), `parsing` reads answers out of
reply text, and `etbench` reads and writes E.T. Bench annotation files: pure Python, no torch,
no network. `benchmarks` is the registry of runnable benchmarks (reader + request setting +
scorer: `shapes`, `llava`), and `runner` asks one through a gateway's /v1/chat/completions
(httpx) and writes predictions and metrics (`modalmesh eval`).
"""
