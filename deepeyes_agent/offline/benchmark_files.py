"""V* Bench, HR-Bench and the synthetic mini benchmark as task lists, with reproducibly shuffled options.

Layouts read (docs/evaluation.md shows them):

* **V* Bench** (``vstar:DIR``): ``DIR/direct_attributes/`` and ``DIR/relative_position/``, each holding
  image files and, beside each image, a JSON file of the same stem with ``question`` and ``options``;
  the public release lists the correct option first, so ``answer`` is optional (a letter or the option's
  text; default: the first option). ``bbox`` (``[x, y, w, h]`` boxes, as released) or ``gt_boxes``
  (``[x1, y1, x2, y2]``) give the target boxes for grounding IoU; ``image`` may name the image file.
* **HR-Bench** (``hrbench:FILE``): the released ``.tsv`` (or a ``.parquet`` with the same columns):
  ``index``, ``question``, option columns ``A``..``D``, ``answer`` (a letter), ``category`` (``single`` or
  ``cross``) and ``image`` (base64-encoded image bytes; an ``image_path`` column works too). The name comes
  from the file (``hr_bench_4k.tsv`` -> ``hrbench_4k``).
* **synthetic** (``synthetic`` or ``synthetic:N``): ``N`` seeded V*-like tasks from
  :mod:`deepeyes_envs.synthetic`, categories ``attribute`` and ``position``; needs no files. Any family of that
  module, with its config's options, as ``synthetic:N,kind=toy_zoom,frame_layout=random,seed=7``: what a policy
  trained on one placement of the zoom toys scores on another.
* **heldout** (``heldout`` or ``heldout:N``): the held-out tasks of the run a policy was exported from.

Options are shuffled per sample with a generator seeded by (seed, sample id), and the answer letter is
remapped, because DeepEyes's unshuffled order ("A" always right) inflated scores by about 5 points.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from deepeyes_envs.data.tasks import Task, TaskError, format_multiple_choice, option_letter
from deepeyes_envs.images import LazyImage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
HRBENCH_CATEGORIES = ("single", "cross")
_OPTION_LINE = re.compile(r"\n\([A-Z]\) ")


@dataclass
class Benchmark:
    """A named list of tasks; ``overall`` says how the headline number is formed: ``"micro"`` (mean over
    samples, V*) or ``"category_mean"`` (mean over categories, HR-Bench's single/cross)."""

    name: str
    kind: str
    tasks: list[Task]
    overall: str = "micro"
    source: str = ""

    def __len__(self) -> int:
        return len(self.tasks)


def category_of(task: Task) -> str:
    return str(task.extra.get("category", ""))


# ---------------------------------------------------------------------------------------------- options
def shuffle_options(task: Task, seed: int) -> Task:
    """The task with its options permuted by (seed, task id), the question re-rendered and the answer
    letter remapped; the permutation is stored in ``extra["option_order"]`` (original indices)."""
    if not task.options:
        return task
    options = list(task.options)
    correct = _answer_index(task.answer, options, task.task_id)
    rng = np.random.default_rng([seed, zlib.crc32(task.task_id.encode("utf-8"))])
    order = [int(i) for i in rng.permutation(len(options))]
    shuffled = [options[i] for i in order]
    stem = str(task.extra.get("stem") or question_stem(task.question))
    return dataclasses.replace(
        task, question=format_multiple_choice(stem, shuffled), answer=option_letter(order.index(correct)),
        options=tuple(shuffled), extra={**task.extra, "stem": stem, "option_order": order,
                                        "answer_text": options[correct]})


def question_stem(question: str) -> str:
    """A multiple-choice question's text before its ``(A) ...`` option lines."""
    match = _OPTION_LINE.search(question)
    return question[: match.start()].rstrip() if match else question


def _answer_index(answer: str, options: Sequence[str], where: str) -> int:
    text = answer.strip()
    letter = text.strip("()").rstrip(".")
    if len(letter) == 1 and letter.isalpha() and 0 <= ord(letter.upper()) - ord("A") < len(options):
        return ord(letter.upper()) - ord("A")
    for i, opt in enumerate(options):
        if opt.strip().lower() == text.lower():
            return i
    raise TaskError(f"{where}: answer {answer!r} is neither an option letter nor an option's text")


def mc_task(task_id: str, stem: str, options: Sequence[str], answer_index: int, images: tuple, *,
            category: str, data_source: str, gt_boxes: tuple = (), env_name: str = "visual_toolbox_v2") -> Task:
    """A multiple-choice benchmark task in the original option order (shuffled later)."""
    options = tuple(str(o) for o in options)
    return Task(question=format_multiple_choice(stem, options), answer=option_letter(answer_index), images=images,
                data_source=data_source, env_name=env_name, task_id=task_id, options=options, gt_boxes=gt_boxes,
                extra={"category": category, "stem": stem})


# ---------------------------------------------------------------------------------------------- V* Bench
def load_vstar(root: str | os.PathLike, *, env_name: str = "visual_toolbox_v2") -> list[Task]:
    """V* Bench from its released folder layout (see the module docstring), sorted by category and file."""
    root = Path(root)
    tasks = []
    found = [c for c in VSTAR_CATEGORIES if (root / c).is_dir()]
    if not found:
        raise FileNotFoundError(f"{root}: no {' or '.join(VSTAR_CATEGORIES)} folder (is this V* Bench?)")
    for category in found:
        for ann_path in sorted((root / category).glob("*.json")):
            tasks.append(_vstar_task(root, category, ann_path, env_name))
    if not tasks:
        raise FileNotFoundError(f"{root}: no JSON annotations in {found}")
    return tasks


def _vstar_task(root: Path, category: str, ann_path: Path, env_name: str) -> Task:
    where = str(ann_path)
    try:
        ann = json.loads(ann_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TaskError(f"{where}: cannot read annotation ({exc})") from exc
    for key in ("question", "options"):
        if key not in ann:
            raise TaskError(f"{where}: missing field {key!r}")
    options = [str(o) for o in ann["options"]]
    answer = ann.get("answer")
    correct = 0 if answer is None else _answer_index(str(answer), options, where)
    image = _vstar_image(root, category, ann_path, ann.get("image"))
    if "gt_boxes" in ann:
        boxes = tuple(tuple(float(v) for v in b) for b in ann["gt_boxes"])
    else:
        xywh = [[float(v) for v in b] for b in ann.get("bbox", [])]
        boxes = tuple((x, y, x + w, y + h) for x, y, w, h in xywh)
    task_id = f"vstar/{category}/{ann_path.stem}"
    return mc_task(task_id, str(ann["question"]).strip(), options, correct,
                   (LazyImage(str(image), name=f"{task_id} image"),), category=category, data_source="vstar",
                   gt_boxes=boxes, env_name=env_name)


def _vstar_image(root: Path, category: str, ann_path: Path, named: Optional[str]) -> Path:
    if named:
        for candidate in (root / named, root / category / named, ann_path.parent / Path(named).name):
            if candidate.is_file():
                return candidate
        raise TaskError(f"{ann_path}: image {named!r} not found")
    for suffix in IMAGE_SUFFIXES:
        for candidate in (ann_path.with_suffix(suffix), ann_path.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    raise TaskError(f"{ann_path}: no image file with the same name ({', '.join(IMAGE_SUFFIXES)})")


# ---------------------------------------------------------------------------------------------- HR-Bench
def load_hrbench(path: str | os.PathLike, *, env_name: str = "visual_toolbox_v2") -> list[Task]:
    """HR-Bench from its released TSV (or parquet) file; see the module docstring for the columns."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in ("question", "answer", "category", "A", "B") if c not in frame.columns]
    if missing or not ({"image", "image_path"} & set(frame.columns)):
        raise TaskError(f"{path}: not an HR-Bench file, missing column(s) {missing or ['image']}")
    letters = [c for c in "ABCDEFGH" if c in frame.columns]
    name = hrbench_name(path)
    tasks = []
    for pos, row in enumerate(frame.to_dict("records")):
        index = row.get("index", pos)
        where = f"{path} row {pos} (index {index})"
        options = [str(row[c]) for c in letters if _present(row[c])]
        image = _hrbench_image(row, path, where)
        tasks.append(mc_task(f"{name}/{index}", str(row["question"]).strip(), options,
                             _answer_index(str(row["answer"]), options, where), (image,),
                             category=hrbench_category(str(row["category"])), data_source=name, env_name=env_name))
    return tasks


def hrbench_name(path: str | os.PathLike) -> str:
    """``hr_bench_4k.tsv`` -> ``hrbench_4k``; any other file name -> ``hrbench_<stem>``."""
    stem = Path(path).stem.lower()
    match = re.search(r"(\d+k)", stem)
    return f"hrbench_{match.group(1)}" if match else f"hrbench_{stem}"


def hrbench_category(value: str) -> str:
    """Normalise the category: single-instance (``single``, ``FSP``) or cross-instance (``cross``, ``FCP``)."""
    v = value.strip().lower()
    if v.startswith("single") or v == "fsp":
        return "single"
    if v.startswith("cross") or v == "fcp":
        return "cross"
    return v


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value).strip() != ""


def _hrbench_image(row: dict, path: Path, where: str) -> LazyImage:
    if _present(row.get("image")):
        data = row["image"]
        if isinstance(data, (bytes, bytearray)):
            return LazyImage(bytes(data), name=f"{where} image")
        try:
            return LazyImage(base64.b64decode(str(data)), name=f"{where} image")
        except ValueError as exc:
            raise TaskError(f"{where}: image is not valid base64 ({exc})") from exc
    image_path = Path(str(row["image_path"]))
    return LazyImage(str(image_path if image_path.is_absolute() else path.parent / image_path), name=f"{where} image")


# ---------------------------------------------------------------------------------------------- synthetic
SYNTHETIC_DEFAULT_N = 40
SYNTHETIC_DEFAULT_SEED = 20250


@dataclass(frozen=True)
class SyntheticSpec:
    """A synthetic benchmark: ``n`` tasks of one family of :mod:`deepeyes_envs.synthetic` drawn with ``seed``,
    the family's config fields overridden by ``options`` (e.g. ``frame_layout``, ``size``, ``target_size``,
    ``frame_size`` for ``toy_zoom``)."""

    n: int = SYNTHETIC_DEFAULT_N
    kind: str = "visual_search"
    seed: int = SYNTHETIC_DEFAULT_SEED
    options: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        """``synthetic`` for the default V*-like set; else the family and every setting that differs, e.g.
        ``synthetic_toy_zoom_frame_layout-random_seed-7``, so two variants in one run never share a folder."""
        if self.kind == "visual_search" and not self.options and self.seed == SYNTHETIC_DEFAULT_SEED:
            return "synthetic"
        parts = [f"{k}-{v}" for k, v in self.options]
        if self.seed != SYNTHETIC_DEFAULT_SEED:
            parts.append(f"seed-{self.seed}")
        return "_".join(["synthetic", self.kind, *parts]).replace("/", "-")

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.n} {self.kind} tasks, seed {self.seed}" + (f", {options}" if options else "")


def parse_synthetic_spec(arg: str) -> SyntheticSpec:
    """``[N][,key=value...]`` after ``synthetic:`` -> a :class:`SyntheticSpec`. ``kind`` picks the family
    (``visual_search``, ``toy``, ``toy_zoom``, ``count``), ``n`` and ``seed`` the tasks; every other key is a field
    of the family's config, checked here so a typo fails before any model loads."""
    from deepeyes_envs.synthetic import SYNTHETIC_KINDS

    fields: dict[str, object] = {}
    for i, item in enumerate(p.strip() for p in arg.split(",") if p.strip()):
        if "=" not in item:
            if i == 0 and item.isdigit():
                fields["n"] = int(item)
                continue
            raise ValueError(f"synthetic benchmark: {item!r} is not N or key=value (e.g. synthetic:64,kind=toy_zoom,"
                             "frame_layout=random)")
        key, _, raw = item.partition("=")
        fields[key.strip()] = _option_value(raw.strip())
    n = fields.pop("n", SYNTHETIC_DEFAULT_N)
    seed = fields.pop("seed", SYNTHETIC_DEFAULT_SEED)
    kind = str(fields.pop("kind", "visual_search"))
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"synthetic benchmark: kind must be one of {list(SYNTHETIC_KINDS)}, got {kind!r}")
    if not isinstance(n, int) or n < 1 or not isinstance(seed, int):
        raise ValueError(f"synthetic benchmark: n must be a positive integer and seed an integer, got {n!r}, {seed!r}")
    spec = SyntheticSpec(n, kind, seed, tuple(sorted(fields.items())))
    _synthetic_source(spec)  # the family's own checks (unknown fields, bad values) now, not mid-run
    return spec


def _option_value(raw: str) -> object:
    """``13`` -> 13, ``0.5`` -> 0.5, ``true`` -> True, ``[3,9]`` -> (3, 9), else the text."""
    import yaml

    value = yaml.safe_load(raw) if raw else ""
    return tuple(value) if isinstance(value, list) else value


def _synthetic_source(spec: SyntheticSpec, size: tuple[int, int] | None = None, env_name: str = "visual_toolbox_v2"):
    from deepeyes_envs.synthetic import SyntheticTaskSource

    options = dict(spec.options)
    if spec.kind == "visual_search" and size is not None:
        options = {"width": size[0], "height": size[1], **options}
    try:
        return SyntheticTaskSource(n=spec.n, seed=spec.seed, kind=spec.kind, env_name=env_name,
                                   data_source=spec.name, **options)
    except TypeError as exc:  # dataclasses.replace names the field it does not know
        raise ValueError(f"synthetic benchmark {spec.kind}: {exc}") from None


def load_synthetic_spec(spec: SyntheticSpec, *, size: tuple[int, int] = (1920, 1080),
                        env_name: str = "visual_toolbox_v2") -> list[Task]:
    """The tasks of a synthetic spec, with a category each: ``attribute``/``position`` for the V*-like set, where
    the frame is for the zoom toys (``center`` or the image quadrant of its centre), the family otherwise."""
    out = []
    for task in _synthetic_source(spec, size, env_name):
        out.append(dataclasses.replace(task, options=tuple(task.options) if task.options else None,
                                       extra={**task.extra, "category": _synthetic_category(task),
                                              "stem": question_stem(task.question)}))
    return out


def _synthetic_category(task: Task) -> str:
    kind = str(task.extra.get("kind", ""))
    if kind != "toy_zoom" or not task.gt_boxes:
        return kind
    x0, y0, x1, y1 = task.gt_boxes[0]
    height, width = task.load_images()[0].shape[:2]
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    if abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1:
        return "center"
    return ("top" if cy < 0.5 else "bottom") + "-" + ("left" if cx < 0.5 else "right")


def heldout_spec(run_data: Optional[dict], n: Optional[int] = None) -> SyntheticSpec:
    """The held-out tasks of a training run (its ``data`` settings, as an export records them) as a synthetic
    spec: the same family, options and seed, so an evaluation plays exactly what the run evaluated on."""
    data = run_data or {}
    if data.get("source", "synthetic") != "synthetic" or not data.get("kind"):
        raise ValueError("the heldout benchmark needs a policy exported from a run on synthetic data (its "
                         "deepeyes_export.json names the held-out family); pass --policy RUN_OR_EXPORT or "
                         "--run-settings DIR, or use synthetic:N,kind=...")
    options = tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                           for k, v in (data.get("options") or {}).items()))
    return SyntheticSpec(n or int(data.get("n_eval") or SYNTHETIC_DEFAULT_N), str(data["kind"]),
                         int(data.get("eval_seed", SYNTHETIC_DEFAULT_SEED)), options)


# ---------------------------------------------------------------------------------------------- specs
def load_benchmark(spec: str, *, seed: int = 0, shuffle: bool = True, env_name: str = "visual_toolbox_v2",
                   synthetic_size: tuple[int, int] = (1920, 1080), run_data: Optional[dict] = None) -> Benchmark:
    """``vstar:DIR``, ``hrbench:FILE``, ``synthetic[:N][,key=value...]`` or ``heldout[:N]`` -> a :class:`Benchmark`.

    ``heldout`` is the held-out set of the run that ``run_data`` (its ``data`` settings) describes.
    """
    kind, _, arg = spec.partition(":")
    if kind == "vstar":
        bench = Benchmark("vstar", kind, load_vstar(arg, env_name=env_name), "micro", arg)
    elif kind == "hrbench":
        bench = Benchmark(hrbench_name(arg), kind, load_hrbench(arg, env_name=env_name), "category_mean", arg)
    elif kind in ("synthetic", "heldout"):
        if kind == "heldout" and arg and not arg.isdigit():
            raise ValueError(f"heldout takes only a count (heldout or heldout:N), got {spec!r}")
        parsed = parse_synthetic_spec(arg) if kind == "synthetic" else heldout_spec(run_data, int(arg) if arg else None)
        name = parsed.name if kind == "synthetic" else "heldout"
        tasks = load_synthetic_spec(parsed, size=synthetic_size, env_name=env_name)
        source = parsed.describe() + (f" {synthetic_size[0]}x{synthetic_size[1]}" if parsed.kind == "visual_search"
                                      and "width" not in dict(parsed.options) else "")
        bench = Benchmark(name, kind, tasks, "micro", source)
    else:
        raise ValueError(f"unknown benchmark {spec!r}; use vstar:DIR, hrbench:FILE, synthetic[:N][,key=value...] or "
                         "heldout[:N]")
    if shuffle:
        bench.tasks = [shuffle_options(t, seed) for t in bench.tasks]
    return bench
