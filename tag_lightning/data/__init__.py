"""FER datasets, AU-grounded reasoning traces and the FERDataModule."""
