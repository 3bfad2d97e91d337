"""Training: the typed run config, the driver of ``train.py``, task schedule, advantages, batches, losses,
the run log and report; ``training/rllib`` ties them to Ray RLlib (algorithm, env runner, learner, module)."""
