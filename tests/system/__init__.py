"""Whole systems: the MONAI Label server, the headless browser, DDP with torchrun, the demo chain and its report, MLflow."""
