"""deepeyes_agent: Qwen-VL policies, multi-turn rollouts and RL training for deepeyes_envs."""
