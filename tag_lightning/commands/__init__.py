"""The `tag` command: data preparation (`cli.py`), LightningCLI training and evaluation (`training.py`,
`callbacks.py`), and `tag demo` with its report; the process settings they share (`quiet.py`, `allocator.py`)."""
