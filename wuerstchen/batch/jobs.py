"""The prompts file: one job per line, read and checked in full before any work.

A job is ``prompt`` plus any setting of ``python -m wuerstchen generate`` under its option's name
(``negative``, ``width``, ``c_steps`` or ``c-steps``, ``lora``, …). JSON Lines give one object per
line (``lora`` / ``control``: a string or a list of strings); a CSV has a ``prompt`` column and a
column per setting (an empty cell: not set; several LoRAs or hints separated by ``;``).

Each value goes through the ``generate`` command's own option types, choices and checks
(:mod:`wuerstchen.options.generate`), so a job accepts exactly what the command line accepts and is refused with
the same words, prefixed by ``FILE:LINE:``. Relative paths (``image``, ``mask``, LoRA and hint files)
are taken from the prompts file's folder.

Each job is named by its content: a slug of the prompt and a hash of the prompt, the family, every
resolved setting (defaults filled in, so ``c_steps: 20`` and no ``c_steps`` are the same job) and
the seed, with files (images, LoRAs) counted by the hash of their bytes, not their paths.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ..options.generate import FAMILY_FLAGS, UsageError, _check_request, _parse_inputs, _parse_settings, _split_numbers
from ..options.generate import generate_parser as options_parser
from ..options.generate import v2_settings
from ..pipeline.stages import OFFICIAL_COMPRESSION

#: ``generate`` options that hold for the whole batch (the ``batch`` command's own flags), not per job.
RUN_LEVEL = ("embeddings", "family", "stage_c_variant", "stage_b_variant", "dtype", "vram_budget", "device")
_NOT_SETTINGS = ("help", "prompt", "models", "out")
MAX_ERRORS = 20  # problems listed before "... and N more"


class JobsError(ValueError):
    """The prompts file cannot be used: ``errors`` holds one ``FILE:LINE: problem`` per problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass
class Job:
    """One line of the prompts file, checked and resolved."""

    line: int
    prompt: str
    family: str  # wuerstchen.files.kinds family name
    settings: Dict[str, Any]  # every value the images depend on besides the prompt (defaults filled in)
    name: str  # content-derived file stem

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    @property
    def files(self) -> List[str]:
        n = self.settings["batch"]
        return [f"{self.name}.png"] if n == 1 else [f"{self.name}_{i}.png" for i in range(n)]

    def group_key(self) -> str:
        """Jobs with equal keys share size and settings (all but prompt, negative and seed)."""
        rest = {k: v for k, v in self.settings.items() if k not in ("negative", "seed")}
        return json.dumps([self.family, rest], sort_keys=True)


def generate_parser() -> argparse.ArgumentParser:
    """The ``generate`` options' parser: the options, types, choices and defaults jobs use."""
    return options_parser()


def job_options(parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, argparse.Action]:
    """Setting name (the option's dest) -> its ``generate`` action, for the settings a job may set."""
    parser = parser or generate_parser()
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTINGS + RUN_LEVEL}


# ----------------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: Path) -> Iterator[Tuple[int, Any]]:
    """(line number, row) per job line: a dict, or a string saying why the line is not one."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        columns = reader.fieldnames or []
        if "prompt" not in [c.strip().lower() for c in columns]:
            raise JobsError([f"{path}:1: a CSV needs a 'prompt' column; the header has "
                             f"{', '.join(repr(c) for c in columns) or 'no columns'}"])
        for row in reader:
            if None in row:
                yield reader.line_num, f"{len(row[None])} more cell(s) than the header's {len(columns)} columns"
                continue
            cells = {k.strip(): v for k, v in row.items() if k is not None and v is not None and v.strip() != ""}
            if cells:
                yield reader.line_num, cells
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = " (a JSON array? give one object per line)" if number == 1 and line.lstrip().startswith("[") else ""
            yield number, f"not JSON: {exc.msg} at column {exc.colno}{hint}"
            continue
        if not isinstance(row, dict):
            yield number, f"expected a JSON object such as {{\"prompt\": \"a cat\"}}, got {type(row).__name__}"
            continue
        yield number, {k: v for k, v in row.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# One value through generate's option


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1]


def convert(action: argparse.Action, value: Any) -> Any:
    """A job's value for ``action``, converted as the command line would (UsageError if not)."""
    flag = _flag(action)
    if isinstance(action, argparse._AppendAction):
        items = value.split(";") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise UsageError(f"{flag}: expected a string or a list of strings, got {value!r}")
        return [i.strip() for i in items if i.strip()]
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise UsageError(f"{flag}: expected true or false, got {value!r}")
    if isinstance(value, (bool, list, dict)):
        raise UsageError(f"{flag}: expected a single value, got {value!r}")
    if action.type is None:
        if not isinstance(value, str):
            raise UsageError(f"{flag}: expected a string, got {value!r}")
        converted = value
    else:
        if action.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            converted = action.type(value if isinstance(value, str) else repr(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            kind = getattr(action.type, "__name__", "value")
            detail = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"expected {kind}"
            raise UsageError(f"{flag} {value!r}: {detail}") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{flag} {value!r}: choose one of {', '.join(map(str, action.choices))}")
    return converted


def setting_name(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_").lower()


# ----------------------------------------------------------------------------------------------
# Paths and fingerprints


def _absolute(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _lora(spec: str, base: Path) -> dict:
    path, numbers = _split_numbers(spec, 2, "--lora")
    model = numbers[0] if numbers else 1.0
    return {"path": _absolute(path, base), "model": model, "text": numbers[1] if len(numbers) > 1 else model}


def lora_spec(lora: dict) -> str:
    """The ``--lora`` spec of a resolved LoRA."""
    return f"{lora['path']}:{lora['model']!r}:{lora['text']!r}"


def _control(spec: str, base: Path) -> Any:
    kind, sep, rest = spec.partition("=")
    if not sep:
        return spec  # parse_control refuses it with generate's words
    path, numbers = _split_numbers(rest, 3, "--control")
    strength = numbers[0] if len(numbers) in (1, 3) else 1.0
    start, end = numbers[-2:] if len(numbers) >= 2 else (0.0, 1.0)
    return {"kind": kind, "path": _absolute(path, base), "strength": strength, "start": start, "end": end}


def control_spec(control: dict) -> str:
    """The ``--control`` spec of a resolved hint."""
    return f"{control['kind']}={control['path']}:{control['strength']!r}:{control['start']!r}:{control['end']!r}"


class Fingerprints:
    """sha256 of files' bytes, each file read once."""

    def __init__(self):
        self._known: Dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if path not in self._known:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._known[path] = digest.hexdigest()
        return self._known[path]


def job_name(prompt: str, family: str, settings: Dict[str, Any], fingerprint) -> str:
    """``slug-hash``: the hash of what the images depend on, files counted by content."""
    identity = json.loads(json.dumps(settings))
    for key in ("image", "mask"):
        if identity.get(key):
            identity[key] = fingerprint(identity[key])
    for entry in identity.get("lora", []) + identity.get("control", []):
        entry["path"] = fingerprint(entry["path"])
    blob = json.dumps({"prompt": prompt, "family": family, **identity}, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "image"
    return f"{slug}-{digest}"


# ----------------------------------------------------------------------------------------------
# One job


class JobReader:
    """Turns rows into :class:`Job` s for one family, with the batch's run-level options."""

    def __init__(self, models: str, out: Path, family: str, run: argparse.Namespace, base: Path,
                 check_device: bool = True):
        self.parser = generate_parser()
        self.options = job_options(self.parser)
        self.defaults = vars(self.parser.parse_args(["--prompt", "", "--models", models, "--out", "x.png"]))
        self.run = {dest: getattr(run, dest, self.defaults[dest]) for dest in RUN_LEVEL}
        if not check_device:  # the workers (other machines) check their own device
            self.run["device"] = None
        self.models, self.out, self.family, self.base = models, out, family, base
        self.v2 = family == FAMILY_FLAGS["v2"]
        self.fingerprint = Fingerprints()
        self._inputs: Dict[tuple, tuple] = {}

    def job(self, line: int, row: Dict[str, Any]) -> Job:
        values = {}
        for key, value in row.items():
            name = setting_name(str(key))
            if name == "prompt":
                continue
            if name in RUN_LEVEL:
                raise UsageError(f"{name!r} is set for the whole batch (batch --{name.replace('_', '-')}), not per job")
            if name not in self.options:
                raise UsageError(f"unknown setting {key!r}; a job takes prompt and generate's settings: "
                                 + ", ".join(sorted(self.options)))
            values[name] = convert(self.options[name], value)
        if "prompt" not in {setting_name(str(k)) for k in row}:
            raise UsageError("no prompt (every job needs \"prompt\")")
        prompt = next(v for k, v in row.items() if setting_name(str(k)) == "prompt")
        if not isinstance(prompt, str):
            raise UsageError(f"the prompt must be a string, got {prompt!r}")
        for key in ("image", "mask"):
            if values.get(key):
                values[key] = _absolute(values[key], self.base)
        loras = [_lora(spec, self.base) for spec in values.get("lora", [])]
        controls = [_control(spec, self.base) for spec in values.get("control", [])]
        values["lora"] = [lora_spec(x) for x in loras]
        values["control"] = [control_spec(c) if isinstance(c, dict) else c for c in controls]

        args = argparse.Namespace(**{**self.defaults, **self.run, **values})
        args.prompt, args.models, args.out = prompt, self.models, str(self.out / "job.png")
        _check_request(args)
        image_given = args.image is not None
        if self.v2:
            prior, decoder, denoise = v2_settings(args, image_given)
            settings = {"prior": asdict(prior), "decoder": asdict(decoder), "denoise": denoise}
        else:
            stage_c, stage_b = _parse_settings(args, image_given)
            settings = {"compression": OFFICIAL_COMPRESSION if args.compression is None else args.compression,
                        "stage_c": asdict(stage_c), "stage_b": asdict(stage_b), "variation": args.variation,
                        "mask": args.mask, "lora": loras, "control": controls}
        key = (args.image, args.mask, tuple(args.control), tuple(args.lora))
        if key not in self._inputs:  # pictures and LoRAs read once per distinct combination
            _parse_inputs(args)
            self._inputs[key] = ()
        settings.update(negative=args.negative, width=args.width, height=args.height, batch=args.batch,
                        seed=args.seed, image=args.image)
        return Job(line, prompt, self.family, settings, job_name(prompt, self.family, settings, self.fingerprint))


def load_jobs(path: str, models: str, out: str, family: str, run: argparse.Namespace,
              check_device: bool = True) -> List[Job]:
    """Every job of the prompts file, or :class:`JobsError` listing each bad line (``FILE:LINE: …``)."""
    file = Path(path)
    if not file.is_file():
        problem = "is a folder" if file.is_dir() else "does not exist"
        raise JobsError([f"--prompts {path!r} {problem}; give a JSON Lines (.jsonl) or CSV (.csv) file"])
    try:
        rows = list(read_rows(file))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise JobsError([f"--prompts {path!r}: cannot be read ({exc})"]) from None
    reader = JobReader(models, Path(out), family, run, file.resolve().parent, check_device)
    jobs, errors = [], []
    for line, row in rows:
        try:
            if isinstance(row, str):
                raise UsageError(row)
            jobs.append(reader.job(line, row))
        except UsageError as exc:
            errors.append(f"{path}:{line}: {exc}")
        except OSError as exc:
            errors.append(f"{path}:{line}: a file it names cannot be read ({exc})")
    if not rows:
        errors.append(f"{path}: no jobs (one JSON object per line, or CSV rows under a header with 'prompt')")
    if errors:
        more = len(errors) - MAX_ERRORS
        raise JobsError(errors[:MAX_ERRORS] + ([f"... and {more} more bad line(s)"] if more > 0 else []))
    return jobs
