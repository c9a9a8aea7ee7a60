"""The local Hugging Face teacher: an image-text-to-text model folder run in this process.

Where no server runs, a model saved with ``save_pretrained`` (Qwen2-VL, Qwen2.5-VL, ...) writes the
traces itself, a batch of requests per `generate` call (`propose_many`, which `inflight.batched`
feeds). transformers and torch are imported only when the teacher is built and asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from tag_lightning.errors import BadValue
from tag_lightning.images import decode_image
from tag_lightning.traces.prompt import build_prompt
from tag_lightning.traces.teachers import Proposal, TeacherRequest, checked_top_p


class HFTeacher:
    """A local Hugging Face image-text-to-text model (Qwen2-VL, Qwen2.5-VL, ...) and its processor."""

    def __init__(self, model: Any, processor: Any, name: str, max_new_tokens: int = 1024, temperature: float = 0.7,
                 top_p: float = 1.0):
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # a batch's answers all start where its prompts end
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = checked_top_p(top_p)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", **options: Any) -> HFTeacher:
        """Load a model folder written by ``save_pretrained`` (local only: nothing is downloaded)."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no Hugging Face model at {folder} (missing config.json); pass the folder of a saved "
                "image-text-to-text model and its processor"
            )
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(folder)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto").to(device)
        except (OSError, ValueError, KeyError) as err:
            raise BadValue(
                f"{folder} does not load as an image-text-to-text model with its processor ({err}); "
                "it needs the model's config and weights plus the processor files (save both with save_pretrained)"
            ) from err
        return cls(model, processor, f"hf:{folder.name}", **options)

    def settings(self) -> dict[str, Any]:
        """What the run's statistics record of this teacher."""
        return {"name": self.name, **self.sampling(), "max_new_tokens": self.max_new_tokens}

    def sampling(self) -> dict[str, Any]:
        """`generate`'s decoding arguments, none left to the model folder's generation config (see `teachers.py`).

        ``top_k`` 0 is off. Greedy decoding (temperature 0) uses neither temperature, top_p nor top_k,
        and transformers warns when they are passed to it.
        """
        if self.temperature <= 0:
            return {"do_sample": False, "repetition_penalty": 1.0}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0,
                "repetition_penalty": 1.0}

    def propose(self, request: TeacherRequest) -> Proposal:
        return self.propose_many([request])[0]

    def propose_many(self, requests: list[TeacherRequest]) -> list[Proposal]:
        """Answer several requests with one `generate` call: the same prompts as one at a time,
        left-padded (the processor's tokenizer pads on the left, so every answer starts at the
        same position and greedy decoding writes what it writes alone)."""
        import torch

        images = [Image.fromarray(decode_image(request.image.read_bytes(), request.image.name)[0])
                  for request in requests]
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(request)}]}],
                add_generation_prompt=True, tokenize=False,
            )
            for request in requests
        ]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.sampling())
        answers = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [Proposal(answer) for answer in answers]
