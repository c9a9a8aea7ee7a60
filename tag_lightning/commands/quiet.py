"""The library messages `tag` hides: notices about the libraries' own code, or about how `tag` uses
them, that a user can do nothing about, printed by every run.

Each warning is matched by its message, category and the module that issues it, so that any other
warning, from the same libraries too (about the user's data, config or hardware), still shows.
`training.lightning_main` applies them to each Lightning command, `tag demo`'s included.
"""

from __future__ import annotations

import logging
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning

# (message, category, module), regular expressions matched at the start, as `warnings.filterwarnings` does.
LIBRARY_WARNINGS = [
    # peft 0.21.2 reads the property that transformers 5.24 renamed (to is_activation_checkpointing)
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # Lightning 2.6.6's own pytree helper builds torch 2.14's deprecated LeafSpec
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # a GRPO checkpoint holds the weights after a batch's optimizer steps, by design (see models/grpo.py)
    (r"Using ModelCheckpoint with manual optimization", UserWarning,
     r"lightning\.pytorch\.callbacks\.model_checkpoint"),
    # FERDataModule resumes mid-epoch exactly through its own state (`ResumableSampler`), which Lightning
    # does not look for: it only knows loaders with a `state_dict`
    (r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
     PossibleUserWarning, r"lightning\.pytorch\.loops\.training_epoch_loop"),
    # `tag` hands LightningCLI its arguments itself (and `tag demo` a list of its own): as intended
    (r"LightningCLI's args parameter is intended", UserWarning, r"lightning\.pytorch\.cli"),
]
EVALUATION_WARNINGS = [
    # validate/test/predict save no checkpoints: the checkpoint callback's state they do not restore is unused
    (r"The dirpath has changed from", UserWarning, r"lightning\.pytorch\.callbacks\.model_checkpoint"),
    (r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint", UserWarning,
     r"lightning\.pytorch\.trainer\.call"),
]
EVALUATION_COMMANDS = ("validate", "test", "predict")

# Lightning's adverts for its cloud services (litlogger, litmodels), logged at INFO by `rank_zero_info`.
LIGHTNING_TIP = "💡 Tip: For seamless cloud"
# `rank_zero_info` logs through whichever of these Lightning's packages set last.
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_library_noise(command: str) -> None:
    """Ignore LIBRARY_WARNINGS, and for an evaluation `command` EVALUATION_WARNINGS (call it inside
    `warnings.catch_warnings()` to keep that to the command), and drop Lightning's tips."""
    noise = LIBRARY_WARNINGS + (EVALUATION_WARNINGS if command in EVALUATION_COMMANDS else [])
    for message, category, module in noise:
        warnings.filterwarnings("ignore", message, category, module)
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(_not_a_lightning_tip)


def _not_a_lightning_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(LIGHTNING_TIP)
