"""Training: data sources (real volumes, synthetic pairs), the training loop, checkpoints, several GPUs.

Nothing is imported here; ``python -m DTNRegistrationLib.train.cli`` (or ``torchrun -m ...``) starts a run.
"""
