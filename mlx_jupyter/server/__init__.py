"""Jupyter server extension hosting one WorkerManager (REST and OpenAI-compatible APIs)."""
