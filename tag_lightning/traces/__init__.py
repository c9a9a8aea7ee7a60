"""The SFT traces: the teachers' interface, the teachers (template, OpenAI-compatible, local HF model)
and the VLM teachers' prompt, their conversations in flight, a stand-in vLLM endpoint, and the builder
that grounds, filters and writes them."""
