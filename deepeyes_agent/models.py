"""Qwen-VL policies and processors from local directories, and a tiny offline test model.

Two problems shape this module. First, nothing may reach a model hub: every loader takes a local
directory and passes ``local_files_only=True``, so a missing file is an error, never a download.
Second, the stock Qwen-VL processors of transformers 5.x insist on a video processor that imports
torchvision, which is broken beside a CPU torch; :class:`QwenVLImageProcessor` is the image-only
processor used everywhere instead (PIL backend, the same ``smart_resize`` geometry).

The tiny model (:func:`build_tiny_qwen2_5_vl`) is a randomly initialised Qwen2.5-VL with a byte-level
BPE tokenizer trained in-process, saved in the standard Hugging Face layout so that transformers and
vLLM both load it. Tests, the CPU config and the docs use it::

    python -m deepeyes_agent.models build-tiny /tmp/tiny-qwen
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

# Control tokens of the Qwen chat format (special: hidden by skip_special_tokens).
QWEN_SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
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

_MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


class QwenVLImageProcessor(ProcessorMixin):
    """Image-only processor for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (no video slot, no torchvision).

    Calling it with ``text`` (containing one ``<|image_pad|>`` per image) and ``images`` returns
    ``input_ids`` with each pad expanded to the image's token count, ``pixel_values``,
    ``image_grid_thw`` and ``mm_token_type_ids``, like the stock processors do for images.
    """

    return_mm_token_type_ids = True

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_PAD
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """Expand one image placeholder to ``t*h*w / merge^2`` pad tokens (used by ``__call__``)."""
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * int(grid.prod() // self.merge_size**2)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"]


class Policy(NamedTuple):
    """A loaded policy: the model and its image-only processor (unpack as ``model, processor``)."""

    model: PreTrainedModel
    processor: QwenVLImageProcessor


def _local_dir(path: str | os.PathLike) -> Path:
    """Resolve a model directory, refusing anything that would need a hub download."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p} is not a local model directory (no config.json); deepeyes never downloads from a hub, "
            "download the model first (e.g. `huggingface-cli download ... --local-dir DIR`)"
        )
    return p


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def load_processor(path: str | os.PathLike, *, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> QwenVLImageProcessor:
    """Load the tokenizer and the PIL image processor of a local Qwen-VL directory.

    ``min_pixels`` / ``max_pixels`` override the saved pixel budget (e.g. a small budget for CPU runs).
    """
    p = _local_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    overrides: dict[str, int] = {}
    if min_pixels is not None:
        overrides["min_pixels"] = min_pixels
    if max_pixels is not None:
        overrides["max_pixels"] = max_pixels
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(p, local_files_only=True, **overrides)
    return QwenVLImageProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def model_class(model_type: str) -> type[PreTrainedModel]:
    """The transformers class for a Qwen-VL ``model_type`` (qwen2_vl, qwen2_5_vl, qwen3_vl)."""
    import transformers

    if model_type not in _MODEL_CLASSES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {sorted(_MODEL_CLASSES)}")
    return getattr(transformers, _MODEL_CLASSES[model_type])


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Load a Qwen-VL model from a local directory, in eval mode, on ``device``."""
    p = _local_dir(path)
    model_type = json.loads((p / "config.json").read_text())["model_type"]
    model = model_class(model_type).from_pretrained(
        p, local_files_only=True, dtype=_resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    return model.to(device).eval()


def load_policy(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32,
                device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                min_pixels: int | None = None, max_pixels: int | None = None) -> Policy:
    """Load a policy model and its processor from one local directory (never from a hub)."""
    model = load_model(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
    return Policy(model, processor)


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0,
                      suppress_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """Log-probabilities of the distribution a policy samples from: ``logits / temperature`` with the
    suppressed tokens (vision pads, which must never be generated) removed.

    Engines record logprobs with this and training recomputes them with it, so both sides agree exactly.
    A temperature of 0 (greedy) scores with temperature 1.
    """
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    if suppress_token_ids:
        logits = logits.clone()
        logits[..., list(suppress_token_ids)] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def token_logprobs(model: PreTrainedModel, inputs: dict[str, torch.Tensor], temperature: float = 1.0,
                   suppress_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """Per-token log-probabilities of ``inputs["input_ids"]`` under ``model`` (the training forward).

    Entry ``[b, i]`` is ``log p(token_i | tokens_<i)`` under :func:`sampling_logprobs` (the quantity the
    engines record at sampling time); entry ``[b, 0]`` is 0. ``inputs`` is what
    ``EpisodeContext.to_model_inputs`` or ``collate`` returns (extra keys are ignored); pass
    ``suppress_token_ids=VisionTokenizer.vision_token_ids`` to match the engines.
    """
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    logits = model(**{k: inputs[k] for k in keys if inputs.get(k) is not None}, use_cache=False).logits
    logp = sampling_logprobs(logits[:, :-1], temperature, suppress_token_ids)
    ids = inputs["input_ids"]
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


# --------------------------------------------------------------------------------------------------
# The tiny test model
# --------------------------------------------------------------------------------------------------

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


def _save_image_processor(out: Path, min_pixels: int, max_pixels: int) -> None:
    """Write preprocessor_config.json in the stock Qwen2-VL format (what vLLM and AutoProcessor expect)."""
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
    path = out / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    # Stock class name (fast and PIL backends share it) plus both spellings of the budget, so older
    # transformers releases (vLLM's) read the same geometry as this one.
    cfg.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
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
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(seed=seed)
    config = tiny_qwen2_5_vl_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(END_OF_TEXT)],
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _embed_chat_template(out)
    _save_image_processor(out, min_pixels, max_pixels)
    (out / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m deepeyes_agent.models build-tiny OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python -m deepeyes_agent.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-tiny", help="build the tiny random Qwen2.5-VL used by tests and the CPU config")
    build.add_argument("out_dir")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--min-pixels", type=int, default=TINY_MIN_PIXELS)
    build.add_argument("--max-pixels", type=int, default=TINY_MAX_PIXELS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = build_tiny_qwen2_5_vl(args.out_dir, seed=args.seed, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(f"built tiny Qwen2.5-VL in {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
