"""The tiny Qwen2.5-VL and Qwen3-VL: random models built offline in about a second, for tests and CPU runs.

Each is a real ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` with a byte-level BPE
tokenizer trained in-process on generated text, saved in the standard Hugging Face layout so that transformers
(and, for Qwen2.5-VL, vLLM) load it::

    python -m deepeyes_agent.policy build-tiny /tmp/tiny-qwen
    python -m deepeyes_agent.policy build-tiny --family qwen3_vl /tmp/tiny-qwen3
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from deepeyes_envs.messages import (
    END_OF_TEXT,
    IM_END,
    IMAGE_PAD,
    QWEN_SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)

# Tool and reasoning tags: single tokens that decode as plain text (as in the released Qwen tokenizers,
# where ``<tool_call>`` is an added, non-special token), so a tiny model can emit each in one step.
TAG_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
              "<think>", "</think>", "<answer>", "</answer>")

# A Qwen2-VL style chat template that renders exactly like deepeyes_envs.messages.render_qwen: no default
# system message is injected, so the env's messages and this template agree character for character.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small pixel budget of the tiny model: 4..64 merged tokens per image keeps CPU tests fast.
TINY_MIN_PIXELS = 4 * 28 * 28
TINY_MAX_PIXELS = 64 * 28 * 28
# The same 4..64 merged tokens for the tiny Qwen3-VL, whose merged token covers 32x32 pixels (patch 16, merge 2).
TINY_QWEN3_MIN_PIXELS = 4 * 32 * 32
TINY_QWEN3_MAX_PIXELS = 64 * 32 * 32

_WORDS_TEXT = (
    "the a an of to in on at for with by from and or not is are was be this that these those it its what "
    "which where when how why who image picture photo object region area zoom crop box left right top "
    "bottom middle center corner color red green blue yellow black white small large text sign number "
    "count person car dog cat tree house table chair cup bottle apple book phone screen window door label "
    "answer question think first call tool if needed then format strictly bounding coordinates pixel "
    "pixels width height see look closer detail visible shown there here one two three four five six "
    "seven eight nine ten yes no option choose helpful assistant user function arguments name type "
    "description json object array string required "
)
_WORDS = tuple(_WORDS_TEXT.split())

_FIXED_TEXT = (
    "You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user query.\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an '
    'image by cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":'
    '"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4}}}}}\n'
    "</tools>\n\n# How to call a tool\nReturn a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
    "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> \n"
    "Error: ZOOM IN ARGUMENTS ARE INVALID\nError: Unknown tool name: image_rotate_tool\n"
)


def tiny_corpus(seed: int = 0, n_samples: int = 400) -> list[str]:
    """Local training text for the tiny tokenizer: prompts, tool calls, numbers and plain words.

    Generated in code from a seeded RNG, so the tokenizer is the same on every machine.
    """
    rng = random.Random(seed)
    texts = [_FIXED_TEXT] * 4
    for _ in range(n_samples):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        box = [rng.randint(0, 2000) for _ in range(4)]
        call = json.dumps({"name": "image_zoom_in_tool", "arguments": {"bbox_2d": box, "label": rng.choice(_WORDS)}})
        texts.append(f"<think>{words}.</think>\n<tool_call>\n{call}\n</tool_call>")
        texts.append(f"What is the {rng.choice(_WORDS)} in the image? {words}? <answer>{rng.choice(_WORDS)}</answer>")
        texts.append(" ".join(str(rng.randint(0, 10**rng.randint(1, 6))) for _ in range(8)))
        texts.append(" ".join(_pseudo_word(rng) for _ in range(12)))
    return texts


_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vi", "zo", "pa", "qu", "ex", "ing", "tion", "er", "st",
              "ch", "th", "ou", "ea", "ly", "ment", "pre", "con", "dis", "un", "re", "ble", "ful", "ness")


def _pseudo_word(rng: random.Random) -> str:
    """A word made of common syllables: varied enough text for the BPE to fill a ~2k vocabulary."""
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
    return word.capitalize() if rng.random() < 0.2 else word


def train_tiny_tokenizer(vocab_size: int = 2048, seed: int = 0) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on :func:`tiny_corpus` and wrap it as a Qwen2 tokenizer with Qwen's tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    shell = Qwen2Tokenizer()  # borrow Qwen2's normalizer and pre-tokenizer so training splits text alike
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = shell.backend_tokenizer.normalizer
    bpe.pre_tokenizer = shell.backend_tokenizer.pre_tokenizer
    n_added = len(QWEN_SPECIAL_TOKENS) + len(TAG_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    bpe.train_from_iterator(tiny_corpus(seed), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, errors="replace", eos_token=IM_END,
                               model_max_length=32768, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != END_OF_TEXT]})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen2_5_vl_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    """Config of the tiny Qwen2.5-VL: 2 text layers of width 128, a 2-block vision tower of width 64."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT, IMAGE_PAD, VIDEO_PAD,
                                                           VISION_START, VISION_END)}
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids[END_OF_TEXT], "eos_token_id": ids[IM_END], "pad_token_id": ids[END_OF_TEXT],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [1], "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=False,
        bos_token_id=ids[END_OF_TEXT], eos_token_id=ids[IM_END], pad_token_id=ids[END_OF_TEXT],
    )


def tiny_qwen3_vl_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    """Config of the tiny Qwen3-VL: 2 text layers of width 128, a 2-block vision tower of width 64.

    What makes it Qwen3-VL and not a renamed Qwen2.5-VL is kept: 16-pixel patches merged 2x2 (a 32-pixel
    image factor), a learned 8x8 position grid interpolated to each image, one deepstack layer (vision block 0
    feeds text layer 0), q/k norms, and interleaved mRoPE over head_dim 32 (sections 6, 5, 5 of its 16
    frequencies, in the proportions of the released 24, 20, 20 of 64).
    """
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT, IMAGE_PAD, VIDEO_PAD,
                                                           VISION_START, VISION_END)}
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                            "mrope_interleaved": True},
        "bos_token_id": ids[END_OF_TEXT], "eos_token_id": ids[IM_END], "pad_token_id": ids[END_OF_TEXT],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    return Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=False,
    )


def _save_image_processor(out: Path, min_pixels: int, max_pixels: int, processor_class: str,
                          **geometry: Any) -> None:
    """Write preprocessor_config.json in the stock Qwen2-VL format (what vLLM and AutoProcessor expect).

    ``geometry`` overrides Qwen2-VL's defaults (patch 14, CLIP mean and std) where a family differs: Qwen3-VL
    checkpoints ship the same image processor class with patch 16 and mean = std = 0.5.
    """
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **geometry).save_pretrained(out)
    path = out / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    # Stock class name (fast and PIL backends share it) plus both spellings of the budget, so older
    # transformers releases (vLLM's) read the same geometry as this one.
    cfg.update(image_processor_type="Qwen2VLImageProcessor", processor_class=processor_class,
               min_pixels=min_pixels, max_pixels=max_pixels)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _embed_chat_template(out: Path) -> None:
    """Also store the chat template inside tokenizer_config.json, where every transformers release looks."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = QWEN_VL_CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def build_tiny_qwen2_5_vl(path: str | os.PathLike, seed: int = 0, *, min_pixels: int = TINY_MIN_PIXELS,
                          max_pixels: int = TINY_MAX_PIXELS) -> Path:
    """Build a tiny random Qwen2.5-VL with a trained tokenizer into ``path``; deterministic given ``seed``.

    About 0.9 M parameters; takes a few seconds on two CPU cores. ``load_policy(path)`` then works offline,
    and so does vLLM. The small default pixel budget keeps images at 4..64 tokens for fast tests.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = train_tiny_tokenizer(seed=seed)
    return _build(path, seed, tokenizer, Qwen2_5_VLForConditionalGeneration, tiny_qwen2_5_vl_config(tokenizer),
                  lambda out: _save_image_processor(out, min_pixels, max_pixels, "Qwen2_5_VLProcessor"))


def build_tiny_qwen3_vl(path: str | os.PathLike, seed: int = 0, *, min_pixels: int = TINY_QWEN3_MIN_PIXELS,
                        max_pixels: int = TINY_QWEN3_MAX_PIXELS) -> Path:
    """Build a tiny random Qwen3-VL (:func:`tiny_qwen3_vl_config`) into ``path``, as the tiny Qwen2.5-VL is built.

    The same tokenizer and chat template (Qwen3-VL keeps Qwen2-VL's vision tokens), the image processor of
    the released checkpoints (patch 16, mean = std = 0.5) and a budget of 4..64 image tokens. About 1.2 M
    parameters; ``load_policy(path)`` works offline. A Qwen3-VL policy reads boxes in thousandths: play it in
    an env with ``coordinate_frame="relative_1000"`` (docs/env.md).
    """
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = train_tiny_tokenizer(seed=seed)
    geometry = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5]}
    return _build(path, seed, tokenizer, Qwen3VLForConditionalGeneration, tiny_qwen3_vl_config(tokenizer),
                  lambda out: _save_image_processor(out, min_pixels, max_pixels, "Qwen3VLProcessor", **geometry))


TINY_FAMILIES = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen3_vl": build_tiny_qwen3_vl}


def _build(path: str | os.PathLike, seed: int, tokenizer: PreTrainedTokenizerBase, model_class: type,
           config: Any, save_image_processor: Callable[[Path], None]) -> Path:
    """Initialise ``model_class(config)`` from ``seed`` and save it with the tokenizer, chat template and
    image processor in the standard layout."""
    from transformers import GenerationConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT)}
    model.generation_config = GenerationConfig(bos_token_id=ids[END_OF_TEXT], pad_token_id=ids[END_OF_TEXT],
                                               eos_token_id=[ids[IM_END], ids[END_OF_TEXT]])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _embed_chat_template(out)
    save_image_processor(out)
    (out / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
    return out
