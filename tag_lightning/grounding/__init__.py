"""How an answer is checked against the detector: the claim rule (one for the trace filter, the rewards
and the metrics), the GRPO rewards, the torchmetrics, the occlusion test, and what `tag test` writes."""
