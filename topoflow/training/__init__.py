"""Building blocks of `train_accelerate.py`: arguments, checkpoints, data position, evaluation,
guards and reports. The training loop itself lives in the script, as in Accelerate's examples."""

__all__: list[str] = []
