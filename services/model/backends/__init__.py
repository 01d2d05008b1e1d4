"""Model backends: Ollama, OpenAI-compatible, local (llama-cpp-python) and deterministic."""
