"""tag_lightning: AU-grounded facial expression recognition with vision-language models (TAG).

The folders follow the data flow, and each imports only from those above it in this list
(`tests/test_imports.py` walks the imports and checks it):

- ``errors``, ``images``, ``boxes``, ``resources``: what every stage shares (one-line user errors,
  image decoding, box arithmetic, files that ship inside wheels);
- ``au/``: the detector: face landmarks, AU regions and intensities, the AU cache;
- ``answers/``: what the model is asked and writes: the label space, the trace grammar, the prompt;
- ``grounding/``: how an answer is checked against the detector: the claim rule, the rewards,
  the metrics, the occlusion test, the reports and drawings;
- ``data/``: FER datasets in their native formats, augmentation, sampling, the FERDataModule;
- ``traces/``: the teachers and the trace builder that writes the SFT traces;
- ``models/``: the VLM wrapper, its backbones, the SFT and GRPO LightningModules;
- ``commands/``: the `tag` command: data preparation, LightningCLI training, the demo.
"""

__version__ = "0.1.0"
