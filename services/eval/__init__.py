"""Evaluation: scoring model replies against benchmark ground truth.

`metrics` holds the scorers (temporal IoU, Charades-STA grounding, E.T. Bench's tasks,
MVBench and LLaVA-style multiple choice, reference answers), `parsing` reads answers out of
reply text, and `etbench` reads and writes E.T. Bench annotation files. Pure Python: no torch,
no network.
"""
