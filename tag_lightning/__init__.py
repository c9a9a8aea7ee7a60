"""tag_lightning: AU-grounded facial expression recognition with vision-language models (TAG)."""

__version__ = "0.1.0"
