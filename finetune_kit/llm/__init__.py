"""One OpenAI-compatible path to every model: hosted, self-hosted or the embedded llama.cpp server."""
