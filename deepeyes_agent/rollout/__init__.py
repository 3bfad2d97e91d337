"""Rollouts: generation engines (transformers, vLLM), the multi-turn episode loop, trajectories, an
OpenAI-endpoint player and the runners that hide which of them plays. No Ray: it runs the same in a notebook."""
