"""modalmesh: serve and train multimodal LLMs as independent services."""

__version__ = "0.1.0"
