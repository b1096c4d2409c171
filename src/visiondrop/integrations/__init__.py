"""Integrations with the tools people run: lmms-eval (evaluation) and vLLM (serving)."""
