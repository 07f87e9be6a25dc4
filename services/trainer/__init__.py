"""The trainer: Celery jobs that run staged multimodal training on DeepSpeed and publish adapter bundles."""
