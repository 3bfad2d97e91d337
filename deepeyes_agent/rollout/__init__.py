"""Generation engines and the multi-turn rollout loop."""
