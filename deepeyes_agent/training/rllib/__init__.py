"""RLlib integration: the algorithm with its config, the env runner, the learner and the RL module."""
