"""`tag demo`: all of TAG on a laptop, phase by phase, each phase the `tag` commands a user would type.

1. data: the sample face photos (or the user's dataset), their AU cache, drawings of a few faces;
2. traces: AU-grounded reasoning traces written by the template teacher; with ``experiment``, a
   controlled experiment: several traces per face, some with a deliberate grounding flaw but the
   right label, kept by TAG's own filter (label and format), as a VLM teacher's would be;
3. model: the tiny random Qwen2.5-VL with the real Qwen vocabulary (or the user's model);
4. evaluation of the untrained model (`tag test`), the zero-shot baseline;
5. SFT on the traces (`tag fit -c configs/sft.yaml`), then its evaluation: greedy answers and
   sampled ones (the model learns the teacher's mix, flaws included);
6. GRPO from the SFT checkpoint (`tag fit -c configs/grpo.yaml`), then its evaluation: does the
   grounding reward remove the flawed evidence? With ``ablation``, the same GRPO with each group's
   grounding rewards paid in a random order (`configs/ablation/shuffled_grounding.yaml`: the same spread,
   no tie to the evidence) and its evaluation, for comparison; once per rollout seed (`rollout_seeds`),
   every run from the same SFT checkpoint;
7. the report: ``report.html`` (one self-contained page) and ``metrics.json``.

The demo runs each command in this process, exactly as typed, through the `tag` it is given
(`cli.main`, which runs the demo: passed in, so that this module does not import its caller), and records
each finished phase in ``demo.json``: a rerun after a kill skips the finished phases, and a killed
training run resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tag_lightning.answers.grammar import PER_STEP
from tag_lightning.errors import UserError, read_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs (editable install)
TINY_MODEL = "tiny-qwen2.5-vl"
STATE_FILE = "demo.json"
DRAWN_FACES = 8
"""Faces drawn with their AU boxes in the data phase (and shown in the report)."""
TagCommand = Callable[[list[str]], int]
"""Runs one `tag` command (its words after `tag`) in this process and returns its exit status."""


@dataclass(frozen=True)
class DemoSettings:
    """What a demo run is made of; a folder holds one demo, so a rerun must ask for the same one.

    Args:
        out: folder for everything the demo writes.
        model: a model folder or hub id already on this machine (None: the tiny random model).
        data: a dataset spec such as ``rafdb:data/RAF-DB`` (None: the sample photos).
        configs: extra LightningCLI config files added to every `tag fit` and `tag test`.
        grpo_configs: extra LightningCLI config files added to every GRPO `tag fit` and `tag test` (the
            ablation's too), after `configs`: a GRPO schedule, say, that leaves SFT as it is.
        sft_steps: SFT optimizer steps (None: the configs' ``max_steps``).
        grpo_steps: GRPO optimizer steps (None: the configs' ``max_steps``).
        workers: worker processes of the AU cache build.
        libreface_weights: LibreFace's ``combined_resnet.pt`` (None: blendshape intensities).
        experiment: the controlled experiment: flawed traces (`traces_per_image`, `error_rate`) and,
            for the tiny model, the settings measured for it (``configs/tiny/experiment_*.yaml``).
        traces_per_image: template traces per face.
        error_rate: the share of each face's traces with a deliberate grounding flaw (0: every trace
            grounded, kept by our grounding filter instead of TAG's).
        error_kinds: the flaw kinds drawn from (`template.FLAW_KINDS`).
        sampled_answers: sampled answers per face scored after each training stage (0: greedy only).
        ablation: also run the matched-variance ablation: the same GRPO from the same SFT checkpoint, with
            each group's grounding rewards paid to its answers in a random order.
        rollout_seeds: GRPO's rollout seeds: each gets its GRPO run (and ablation) from the same SFT
            checkpoint, so each figure has its spread over seeds.
        trace_format: the traces' format (`answers.grammar.TRACE_FORMATS`): the teacher writes it, SFT
            teaches it, and every stage's prompt asks for it.
    """

    out: Path
    model: str | None = None
    data: str | None = None
    configs: tuple[str, ...] = ()
    grpo_configs: tuple[str, ...] = ()
    sft_steps: int | None = None
    grpo_steps: int | None = None
    workers: int = 2
    libreface_weights: str | None = None
    experiment: bool = False
    traces_per_image: int = 1
    error_rate: float = 0.0
    error_kinds: tuple[str, ...] = ("hallucination",)
    sampled_answers: int = 8
    ablation: bool = False
    rollout_seeds: tuple[int, ...] = (0,)
    trace_format: str = PER_STEP

    def to_json(self) -> dict:
        """The settings as demo.json holds them: paths as text, tuples as lists."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()} | {
            "out": str(self.out)}


@dataclass
class Phase:
    """One step of the demo: its title, the `tag` commands it runs, and what it leaves to check it is done."""

    name: str
    title: str
    commands: Callable[[], list[list[str]]]
    """The commands, built when the phase starts (a resumed fit adds its last checkpoint)."""
    leaves: Callable[[], bool] = lambda: True
    quiet_commands: Callable[[], list[list[str]]] = lambda: []
    """Commands run after `commands`, built then (they may read what those wrote), their output
    kept off the console but for errors."""


@dataclass
class DemoState:
    """``demo.json``: the settings, and each finished phase with its commands and seconds."""

    path: Path
    settings: dict
    finished: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: DemoSettings) -> DemoState:
        path = settings.out / STATE_FILE
        if not path.is_file():
            return cls(path, settings.to_json())
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(saved.get("settings"), dict) and isinstance(saved.get("finished"), dict)):
                raise ValueError("no settings and finished phases in it")
        except (ValueError, AttributeError) as err:
            raise UserError(f"{path} is not a readable demo state ({err}): delete it to run every phase again in "
                            f"{settings.out}, or give another --out") from None
        saved["settings"].setdefault("trace_format", PER_STEP)  # a folder from before the option had ours
        saved["settings"].setdefault("grpo_configs", [])  # and none
        if "rollout_seed" in saved["settings"]:  # and one seed
            saved["settings"]["rollout_seeds"] = [saved["settings"].pop("rollout_seed")]
        if saved["settings"] != settings.to_json():
            changed = sorted(key for key, value in settings.to_json().items() if saved["settings"].get(key) != value)
            raise UserError(f"{settings.out} holds a demo run with other settings ({', '.join(changed)}): rerun it "
                            f"with the same options, or give another --out")
        return cls(path, saved["settings"], saved["finished"])

    def finish(self, phase: str, commands: list[list[str]], seconds: float) -> None:
        self.finished[phase] = {"commands": [_shown(argv) for argv in commands], "seconds": round(seconds, 1)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")  # a kill mid-write leaves the previous state whole
        partial.write_text(json.dumps({"settings": self.settings, "finished": self.finished}, indent=2) + "\n",
                           encoding="utf-8")
        partial.replace(self.path)


def _shown(argv: list[str]) -> str:
    return "tag " + shlex.join(argv)


class Demo:
    """The phases of one demo folder, as commands (see the module doc)."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.out = settings.out
        self.samples = self.out / "samples" / "manifest.csv"
        self.au_cache = self.out / "au_cache"
        self.traces = self.out / "traces.jsonl"
        self.drawings = self.out / "drawings"
        self.model = str(self.out / TINY_MODEL) if settings.model is None else resolve_model(settings.model)
        self.data = f"manifest:{self.samples}" if settings.data is None else settings.data
        # The split the user's dataset is evaluated on, checked before any phase runs.
        self.evaluated_split = None if settings.data is None else evaluation_split(settings.data)

    # -- where each phase leaves its results ------------------------------------------------------

    def checkpoints(self, stage: str) -> Path:
        return self.out / stage / "checkpoints"

    def evaluation_root(self, stage: str) -> Path:
        return self.out / "eval" / stage

    def evaluation(self, stage: str) -> Path | None:
        """The newest evaluation folder of `stage` (a rerun after a kill writes a new one)."""
        found = sorted(self.evaluation_root(stage).rglob("metrics.json"), key=lambda path: path.stat().st_mtime)
        return found[-1].parent if found else None

    # -- the phases -------------------------------------------------------------------------------

    def phases(self) -> list[Phase]:
        phases = [Phase("data", "sample photos, AU cache and AU drawings", self._data_commands,
                        (self.au_cache / "records.sqlite").is_file, self._drawing_commands),
                  Phase("traces", "AU-grounded traces from the template teacher", self._trace_commands,
                        self.traces.is_file)]
        if self.settings.model is None:
            phases.append(Phase("model", "the tiny random Qwen2.5-VL", lambda: [
                ["prepare", "tiny-model", "--out", self.model]], lambda: (Path(self.model) / "config.json").is_file()))
        phases += [
            Phase("before_sft", "evaluation of the untrained model", lambda: [self.test_command("before_sft", "sft", None)],
                  lambda: self.evaluation("before_sft") is not None),
            Phase("sft", "SFT on the traces", lambda: [self.fit_command("sft")],
                  (self.checkpoints("sft") / "last.ckpt").is_file),
            Phase("after_sft", "evaluation after SFT",
                  lambda: [self.test_command("after_sft", "sft", self.checkpoints("sft") / "last.ckpt")],
                  lambda: self.evaluation("after_sft") is not None),
        ]
        for run, (title, _, _) in self.grpo_runs().items():
            phases += [
                Phase(run, title, lambda run=run: [self.fit_command(run)],
                      (self.checkpoints(run) / "last.ckpt").is_file),
                Phase(f"after_{run}", f"evaluation after {title.split(':')[-1].strip()}",
                      lambda run=run: [self.test_command(f"after_{run}", "grpo", self.checkpoints(run) / "last.ckpt")],
                      lambda run=run: self.evaluation(f"after_{run}") is not None),
            ]
        return phases

    def grpo_runs(self) -> dict[str, tuple[str, int, bool]]:
        """Every GRPO run by stage name: (title, rollout seed, whether it is the ablation). One seed keeps the
        plain names (grpo, grpo_ablation); several add ``_seed<N>``."""
        seeds = self.settings.rollout_seeds
        runs = {}
        for seed in seeds:
            suffix = "" if len(seeds) == 1 else f"_seed{seed}"
            runs[f"grpo{suffix}"] = (f"GRPO with the format, answer and grounding rewards{suffix.replace('_', ', ')}",
                                     seed, False)
            if self.settings.ablation:
                runs[f"grpo_ablation{suffix}"] = (
                    f"the ablation: the same GRPO with the grounding rewards shuffled within each group"
                    f"{suffix.replace('_', ', ')}", seed, True)
        return runs

    def _data_commands(self) -> list[list[str]]:
        commands = []
        if self.settings.data is None:
            commands.append(["prepare", "samples", "--out", str(self.samples.parent)])
        images = str(self.samples) if self.settings.data is None else self.settings.data
        build = ["prepare", "au-cache", "--images", images, "--out", str(self.au_cache),
                 "--workers", str(self.settings.workers)]
        if self.settings.libreface_weights:
            build += ["--libreface-weights", self.settings.libreface_weights]
        return commands + [build]

    def _drawing_commands(self) -> list[list[str]]:
        """`tag prepare au-show --draw` for the first few images that are files (after the cache is built)."""
        from tag_lightning.data.datasets import parse_data_spec

        files = [sample.image.path for sample in parse_data_spec(self.data, keep_missing=True)
                 if sample.image.path is not None][:DRAWN_FACES]
        return [["prepare", "au-show", path, "--cache", str(self.au_cache),
                 "--draw", str(self.drawings / f"{Path(path).stem}_aus.png")] for path in files]

    def _trace_commands(self) -> list[list[str]]:
        split = [] if self.settings.data is None else ["--split", "train"]
        experiment = ["--traces-per-image", str(self.settings.traces_per_image)]
        if self.settings.error_rate:  # TAG's filter keeps the flawed traces, as it would a VLM teacher's
            experiment += ["--error-rate", str(self.settings.error_rate),
                           "--error-kinds", ",".join(self.settings.error_kinds), "--filter", "paper"]
        return [["prepare", "traces", "--data", self.data, *split, "--cache", str(self.au_cache),
                 "--out", str(self.traces), "--trace-format", self.settings.trace_format, *experiment]]

    def _common(self, config: str) -> list[str]:
        """The config files and the paths of this folder, for every `tag fit` and `tag test`."""
        pieces = ["-c", str(CONFIGS / config), "-c", str(CONFIGS / "data" / "samples.yaml")]
        if self.settings.model is None:  # the tiny model's measured settings (see configs/tiny/)
            pieces += ["-c", str(CONFIGS / "tiny" / config)]
            if self.settings.experiment:
                pieces += ["-c", str(CONFIGS / "tiny" / f"experiment_{config}")]
                paper = CONFIGS / "tiny" / f"experiment_paper_{config}"  # where the paper's format measured otherwise
                if self.settings.trace_format == "paper" and paper.is_file():
                    pieces += ["-c", str(paper)]
        for extra in (*self.settings.configs, *(self.settings.grpo_configs if config == "grpo.yaml" else ())):
            pieces += ["-c", extra]
        paths = [f"--model.init_args.network.init_args.config.model_path={self.model}",
                 f"--data.au_cache={self.au_cache}", f"--data.train_traces={self.traces}",
                 f"--data.trace_format={self.settings.trace_format}"]
        paths += [f"--data.{role}_data={self.data}" for role in ("train", "val", "test")]
        if self.evaluated_split is not None:
            paths += ["--data.train_split=train", f"--data.val_split={self.evaluated_split}",
                      f"--data.test_split={self.evaluated_split}"]
        return pieces + paths

    def fit_command(self, stage: str) -> list[str]:
        """`tag fit` of a training stage (sft, or one of `grpo_runs`); a killed run's last checkpoint is resumed."""
        steps = self.settings.sft_steps if stage == "sft" else self.settings.grpo_steps
        config = "sft.yaml" if stage == "sft" else "grpo.yaml"
        _, seed, ablation = self.grpo_runs().get(stage, ("", 0, False))
        control = ["-c", str(CONFIGS / "ablation" / "shuffled_grounding.yaml")] if ablation else []
        argv = ["fit", *self._common(config), *control, *([f"--trainer.max_steps={steps}"] if steps else []),
                f"--trainer.default_root_dir={self.out / stage}",
                f"--trainer.callbacks.init_args.dirpath={self.checkpoints(stage)}"]
        if stage != "sft":  # every GRPO run starts from the same SFT checkpoint, its seed the run's
            argv += [f"--model.init_args.init_from={self.checkpoints('sft') / 'last.ckpt'}",
                     f"--model.init_args.rollout_seed={seed}"]
        last = self.checkpoints(stage) / "last.ckpt"
        if last.is_file():  # a killed run: go on from its last checkpoint, not from the start
            argv.append(f"--ckpt_path={last}")
        return argv

    def test_command(self, stage: str, config: str, checkpoint: Path | None) -> list[str]:
        """`tag test` for `stage`, built as the `config` stage's model, from `checkpoint` (None: untrained)."""
        argv = ["test", *self._common(f"{config}.yaml"), f"--trainer.default_root_dir={self.evaluation_root(stage)}"]
        if config == "grpo":  # the checkpoint holds the trained weights; the SFT start is not needed
            argv.append("--model.init_args.init_from=null")
        if checkpoint and self.settings.sampled_answers:  # what the trained model tends to say, not only its greedy answer
            argv.append(f"--model.init_args.sampled_answers={self.settings.sampled_answers}")
        return argv + ([f"--ckpt_path={checkpoint}"] if checkpoint else [])

    # -- running ----------------------------------------------------------------------------------

    def run(self, tag: TagCommand, until: str | None = None) -> Path:
        """Run every phase not finished yet (up to the one named `until`, if given) through `tag`, then
        write the report; returns its path (the demo folder when stopped early)."""
        from tag_lightning.commands.demo_report import write_report

        state = DemoState.open(self.settings)
        phases = self.phases()
        if until is not None:
            phases = phases[: [phase.name for phase in phases].index(until) + 1]
        for number, phase in enumerate(phases, start=1):
            header = f"[{number}/{len(phases) + 1}] {phase.title}"
            if phase.name in state.finished and phase.leaves():
                print(f"{header}: done in an earlier run, skipped")
                continue
            print(f"\n{header}")
            started = time.perf_counter()
            commands = phase.commands()
            for argv in commands:
                run_command(tag, argv)
            quiet = phase.quiet_commands()
            with contextlib.redirect_stdout(io.StringIO()):
                for argv in quiet:
                    run_command(tag, argv, echo=False)
            state.finish(phase.name, commands + quiet, time.perf_counter() - started)
        if until is not None:
            return self.out
        print(f"\n[{len(phases) + 1}/{len(phases) + 1}] the report")
        report = write_report(self, state)
        print(f"report: {report}\nmetrics of the three stages: {self.out / 'metrics.json'}")
        return report


def run_command(tag: TagCommand, argv: list[str], echo: bool = True) -> None:
    """Run one `tag` command in this process; a failure stops the demo with the command that failed."""
    if echo:
        print(f"$ {_shown(argv)}", flush=True)
    if tag(argv) != 0:
        raise UserError(f"the demo stopped at `{_shown(argv)}` (its error is above); fix it and rerun `tag demo` "
                        "with the same options: finished phases are not redone")


def resolve_model(model: str) -> str:
    """A local model folder, or a hub id already in the Hugging Face cache; nothing is downloaded."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: the folder has no config.json (a Hugging Face model folder has)")
        return str(path)
    if path.exists() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UserError(f"--model {model}: no model folder there")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError:
        local = f"models/{model.rsplit('/', 1)[-1]}"
        raise UserError(f"--model {model}: no such folder, nor a hub id in the local Hugging Face cache (the demo "
                        f"downloads nothing). Fetch it where the hub is reachable, e.g. `hf download {model} "
                        f"--local-dir {local}`, then pass --model {local}") from None


def evaluation_split(spec: str) -> str:
    """The split a dataset is evaluated on: its ``test`` split, or ``val`` where it has none (AffectNet).
    A spec that is no dataset, or whose root is missing, is refused (before any phase runs)."""
    from tag_lightning.data.datasets import resolve_data_spec

    resolved = resolve_data_spec(spec)
    if resolved is None:
        raise UserError(f"--data {spec}: give a dataset spec (rafdb:ROOT, ferplus:ROOT, affectnet:ROOT, "
                        "manifest:FILE.csv), not a data config; the demo sets the splits itself")
    adapter, root = resolved
    if not root.exists():
        raise UserError(f"--data {spec}: no such file or folder {root}")
    splits = adapter.splits or ("test",)
    return "test" if "test" in splits else "val"


def prepare_demo_data(out: str | Path, tag: TagCommand, workers: int = 2) -> Path:
    """The default demo's first phases only (photos, AU cache, traces, tiny model) in `out`, run
    through `tag` (`cli.main`): what tests and benchmarks train on. Returns `out`."""
    return Demo(DemoSettings(out=Path(out), workers=workers)).run(tag, until="model")


def run_demo(settings: DemoSettings, tag: TagCommand) -> Path:
    """Run (or resume) the demo of `settings`; returns the report's path."""
    check_files(settings)
    return Demo(settings).run(tag)


def check_files(settings: DemoSettings) -> None:
    """Refuse a file a later phase would fail on before the first phase runs: a mistake found after SFT
    would cost the SFT, since a rerun with other options is another demo (`DemoState.open`)."""
    if settings.out.exists() and not settings.out.is_dir():
        raise UserError(f"--out {settings.out} is a file: the demo writes a folder; give a new or earlier demo folder")
    if not (CONFIGS / "sft.yaml").is_file():
        raise UserError(f"no configs folder at {CONFIGS}: `tag demo` runs from a clone of the repository "
                        "installed with `pip install -e .`")
    for option, configs in (("--config", settings.configs), ("--grpo-config", settings.grpo_configs)):
        for config in configs:
            if not Path(config).is_file():
                raise UserError(f"{option} {config}: no such file; give a LightningCLI YAML config")
            read_yaml(config)  # a syntax error names the file and line now, not at the first `tag test`
    if settings.libreface_weights is not None and not Path(settings.libreface_weights).is_file():
        raise UserError(f"--libreface-weights {settings.libreface_weights}: no such file; give LibreFace's "
                        "combined_resnet.pt, or leave the option out for blendshape intensities")
