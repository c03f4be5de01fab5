"""Ray Tune sweeps over i2v experiments (`python -m tune.sweep` / `i2v tune`). Imports i2v; i2v never imports tune."""
