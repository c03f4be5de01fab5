"""Training on Ray Train: the per-worker loop (`loop.py`), the driver behind `i2v train` (`driver.py`), the only
DeepSpeed code (`deepspeed.py`), optimizer/schedule (`optim.py`) and checkpoints (`checkpoint.py`)."""
