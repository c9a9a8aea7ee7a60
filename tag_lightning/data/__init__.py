"""FER datasets in their native formats, the sample photos, augmentation that moves the boxes with the
face, resumable sampling, and the FERDataModule that couples them with the AU cache and the traces."""
