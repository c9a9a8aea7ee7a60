"""What the model is asked and what it writes: one label space for every dataset, the grammar of an
AU-grounded trace (both formats), and the prompt that asks for it."""
