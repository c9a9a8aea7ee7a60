"""The SFT traces: teachers (template, OpenAI-compatible, local HF model), their conversations in
flight, a stand-in vLLM endpoint, and the builder that grounds, filters and writes them."""
