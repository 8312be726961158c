"""Tool-integrated reasoning: trajectory format, tools (python sandbox, search, calculator), rollout loop."""
