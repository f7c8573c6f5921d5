"""Checkpoints for the other phases of model work: cached preprocessing stages (``stages``, no Lightning) and
resumable hyper-parameter studies (``hpo``, Optuna + Lightning)."""
