"""Cadence policies: YAML files under ``policies/`` that decide when each gear trains.

One policy per file. A policy names which traces it learns from (``learning_key`` or all), the
teacher, the base student, the registered model, promotion targets, retry/resume behaviour and
its **gears**; each gear has a trigger (a batch of N new traces, or a cron expression), trace
filters and the GKD/optimiser/eval settings, which are the run-spec models of
:mod:`atlasd.runspec` (one definition for a policy field and a run-spec field). Every field is
documented in ``policies/README.md``.

Loading never raises on bad input: :func:`load_policy_file` raises :class:`PolicyFileError`
carrying every :class:`PolicyIssue` (file, line, field path, reason), and :class:`PolicySet`
keeps the previous version of a policy whose file stopped validating. Poison files cost little:
a file over :data:`MAX_POLICY_BYTES` is refused unread, binary content (control characters, not
UTF-8) is refused before parsing, and YAML whose aliases expand past :data:`MAX_POLICY_NODES`
values (a "billion laughs" bomb) or into a cycle is refused before any Python object is built.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from apscheduler.triggers.cron import CronTrigger
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, PlainSerializer, ValidationError, model_validator

from atlasd.runspec import (
    EvalSpec,
    GKDSettings,
    MlflowTarget,
    OptimSettings,
    RunSpec,
    SessionFilters,
    Targets,
    TraceSelection,
    _Strict,
)

# A policy is a page of YAML (the shipped ones are under 5 KB, about 130 values). Pure-Python
# PyYAML needs about 10 s per MiB of pathological YAML, so the caps keep a load well under a second.
MAX_POLICY_BYTES = 64 << 10  # refused unread above this
MAX_POLICY_NODES = 10_000  # values (mappings, lists, scalars) once aliases are expanded
MAX_DURATION = timedelta(days=3650)  # any later datetime arithmetic stays in range
POLICY_SUFFIXES = (".yaml", ".yml")
CRON_PRIORITY = 10  # high-quality (cron) runs are claimed before queued batch runs
BATCH_PRIORITY = 0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?[wdhms])+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_UNIT_S = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
# crontab's day-of-week field with names only (sun, mon-fri, sat/2, ...): see CronSchedule
_DOW_NAMES = re.compile(r"^(\*|[a-z]{3}(-[a-z]{3})?(/\d+)?)(,[a-z]{3}(-[a-z]{3})?(/\d+)?)*$", re.IGNORECASE)


def parse_duration(value: Any) -> Any:
    """``90`` / ``90.5`` (seconds), ``"90s"``, ``"30m"``, ``"2h"``, ``"7d"``, ``"1w"``, ``"1h30m"``;
    at most :data:`MAX_DURATION` either way (``.inf`` or ``1e12w`` is a ValueError, not an overflow)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 30m, 2h, 1d, 1h30m")
    if isinstance(value, (int, float)):
        return _seconds(value)
    if isinstance(value, str) and _DURATION.match(value.strip()):
        return _seconds(sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(value)))
    if isinstance(value, timedelta):
        return value
    raise ValueError(f"invalid duration {value!r}: use seconds or a string like 30m, 2h, 1d, 1h30m")


def _seconds(value: float) -> timedelta:
    if not math.isfinite(value) or abs(value) > MAX_DURATION.total_seconds():
        raise ValueError(f"a duration is at most {MAX_DURATION.days} days")
    return timedelta(seconds=value)


def _positive(value: timedelta) -> timedelta:
    if value.total_seconds() <= 0:
        raise ValueError("a duration must be positive")
    return value


# A positive duration: written as seconds or "1h30m", held as a timedelta, dumped as seconds.
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    AfterValidator(_positive),
    PlainSerializer(lambda d: d.total_seconds(), return_type=float),
]


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"invalid name {value!r}: use letters, digits, '_', '-', '.' (start with a letter or digit, at most 100)"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]


class BatchThreshold(_Strict):
    every: int = Field(..., gt=0, le=10_000_000, description="Fire once per this many new traces passing the filters.")
    min_interval: Duration | None = Field(None, description="Never fire twice within this duration.")
    max_wait: Duration | None = Field(
        None, description="Fire a partial batch (at least min_traces) once the oldest pending trace is this old.")
    min_traces: int = Field(1, gt=0, description="The smallest partial batch max_wait fires.")
    backoff_after_reject: bool = Field(
        True, description="After the gate rejects this gear's run, wait min_interval (1 h if unset) before the next "
                          "fire, doubling with each further rejection (at most 7 days); a promotion resets it.")


class CronSchedule(_Strict):
    expr: str = Field(..., description="Five-field crontab expression: minute hour day-of-month month day-of-week.")
    timezone: str = Field("UTC", description="IANA time zone the expression is read in.")

    @model_validator(mode="after")
    def _valid(self) -> CronSchedule:
        fields = self.expr.split()
        if len(fields) == 5 and not _DOW_NAMES.match(fields[4]):
            # APScheduler 3 numbers weekdays from Monday=0, crontab from Sunday=0: refuse the ambiguity
            raise ValueError(
                f"day-of-week {fields[4]!r}: write weekdays as names (sun, mon-fri, sat,sun) or '*'; "
                "numbers are ambiguous (crontab counts from Sunday=0, APScheduler 3 from Monday=0)"
            )
        self.build()
        return self

    def build(self) -> CronTrigger:
        """The APScheduler 3.11 trigger (raises ValueError on a bad expression or time zone)."""
        try:
            return CronTrigger.from_crontab(self.expr, timezone=self.timezone)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {self.expr!r}: {exc}") from None
        except Exception as exc:  # zoneinfo.ZoneInfoNotFoundError and friends
            raise ValueError(f"invalid time zone {self.timezone!r}: {exc}") from None


class Trigger(_Strict):
    """Exactly one of ``batch`` (fast gear) and ``cron`` (high-quality gear)."""

    batch: BatchThreshold | None = None
    cron: CronSchedule | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Trigger:
        if (self.batch is None) == (self.cron is None):
            raise ValueError("set exactly one of 'batch' and 'cron'")
        return self

    @property
    def kind(self) -> Literal["batch", "cron"]:
        return "batch" if self.batch is not None else "cron"


class Filters(SessionFilters):
    """Which recorded traces count toward a gear and go into its runs. Defaults: the fast gear."""

    max_traces: int = Field(
        20_000, gt=0, le=10_000_000,
        description="At most this many new traces go into one run, the newest; older pending ones are skipped "
                    "(reported; still sampled as rehearsal). `atlasd trigger --backfill` takes them all.")


class Gear(_Strict):
    trigger: Trigger
    filters: Filters = Filters()
    gkd: GKDSettings = GKDSettings()
    optim: OptimSettings = OptimSettings()
    eval: EvalSpec = EvalSpec()
    wall_clock_limit: Duration = Field(timedelta(hours=24), description="The runner stops a run after this long.")

    @model_validator(mode="after")
    def _batch_fits(self) -> Gear:
        if self.trigger.batch is not None and self.trigger.batch.every > self.filters.max_traces:
            raise ValueError(f"trigger.batch.every ({self.trigger.batch.every}) is larger than filters.max_traces "
                             f"({self.filters.max_traces}): every run would skip traces")
        return self

    @property
    def kind(self) -> Literal["batch", "cron"]:
        return self.trigger.kind

    @property
    def priority(self) -> int:
        return CRON_PRIORITY if self.kind == "cron" else BATCH_PRIORITY


class RetrySettings(_Strict):
    max_retries: int = Field(2, ge=0, le=20, description="Automatic retries of a failed run for the same window.")


class Policy(_Strict):
    name: Name = Field(..., description="Unique policy name; defaults to the file name without .yaml.")
    learning_key: str | None = Field(None, description="Only sessions with this metadata.learning_key; null: all.")
    teacher: str = Field(..., min_length=1, description="Teacher model: local path or hub id.")
    student: str = Field(..., min_length=1, description="Base student: local path or hub id.")
    registered_model: Name | None = Field(None, description="MLflow registered model name; default: the policy name.")
    targets: Targets = Targets()
    retry: RetrySettings = RetrySettings()
    resume_interrupted: bool = Field(True, description="Re-queue an interrupted run to resume from its checkpoint.")
    catchup_window: Duration | None = Field(None, description="Override of ATLASD_CATCHUP_WINDOW_S for this policy.")
    on_taint: Literal["none", "retrain"] = Field(
        "none", description="When a session a run trained on is revoked (its version is tagged atlasd.tainted either "
        "way): retrain queues a clean run of that gear over the same window, once per run.")
    gears: dict[Name, Gear] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _one_eval_split(self) -> Policy:
        """The frozen eval split is the policy's (atlasd/evalsplit.py): every gear the same one."""
        splits = {(g.eval.eval_fraction, g.eval.split_salt) for g in self.gears.values()}
        if len(splits) > 1:
            raise ValueError("every gear of a policy must have the same eval.eval_fraction and eval.split_salt (the "
                             "frozen eval split is per policy); gears have " + ", ".join(
                                 f"{name}: {g.eval.eval_fraction:g}/{g.eval.split_salt!r}" for name, g in self.gears.items()))
        return self

    @model_validator(mode="after")
    def _drift_on_probe_sets(self) -> Policy:
        if self.targets.max_drift is not None:
            missing = [name for name, g in self.gears.items() if not g.eval.probe_set]
            if missing:
                raise ValueError("targets.max_drift is measured on the probe set: set eval.probe_set in gear(s) "
                                 + ", ".join(missing))
        return self

    @property
    def model_name(self) -> str:
        return self.registered_model or self.name

    def run_spec(
        self,
        gear: str,
        *,
        run_id: int,
        trigger: str,
        window_lo: int,
        window_hi: int,
        student: str | None,
        champion_version: str | None,
        output_dir: Path,
        mlflow: MlflowTarget | None = None,
        resume: bool = False,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        split_salt: str | None = None,
    ) -> RunSpec:
        """The run spec of one run of ``gear``: ``student`` is the champion's checkpoint (None: the
        base student); ``split_salt``: the eval split's salt as recorded (atlasd.evalsplit.EvalSplit.key_salt;
        None: the gear's configured one)."""
        g = self.gears[gear]
        return RunSpec(
            run_id=run_id,
            policy=self.name,
            gear=gear,
            trigger=trigger,
            teacher=self.teacher,
            student=student or self.student,
            base_student=self.student,
            champion_version=champion_version,
            traces=TraceSelection(
                **g.filters.model_dump(include=set(SessionFilters.model_fields)),
                learning_key=self.learning_key,
                window_lo=window_lo,
                window_hi=window_hi,
                rehearsal_seed=window_hi,
            ),
            gkd=g.gkd,
            optim=g.optim,
            eval=g.eval if split_salt is None else g.eval.model_copy(update={"split_salt": split_salt}),
            targets=self.targets,
            output_dir=output_dir,
            mlflow=mlflow,
            resume=resume,
            device=device,
        )


# ---------------------------------------------------------------- loading and errors


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in one policy file: where (file, line, dotted field path) and why."""

    file: str
    field: str
    reason: str
    line: int | None = None  # 1-based

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class PolicyFileError(ValueError):
    def __init__(self, file: str, issues: list[PolicyIssue]):
        self.file = file
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _compose(text: str, file: str) -> tuple[Any, yaml.Node | None]:
    """The document's Python data and node tree; any failure is a :class:`PolicyFileError`.
    Aliases stay shared nodes until :func:`_check_expansion` has bounded what they expand to."""

    def refuse(reason: str, line: int | None = None) -> PolicyFileError:
        return PolicyFileError(file, [PolicyIssue(file, "", reason, line)])

    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters (NUL, ...) at once
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, file)
        data = loader.construct_document(node) if node is not None else None
    except PolicyFileError:  # from _check_expansion
        raise
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise refuse(f"not a text file: unprintable character U+{exc.character:04X}", line) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = " ".join(str(p) for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise refuse(f"invalid YAML: {reason}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise refuse(f"invalid YAML: {exc}") from None
    except RecursionError:
        raise refuse("invalid YAML: nested too deeply") from None
    except ValueError as exc:  # SafeConstructor: a date like 2001-13-45, an integer of over 4300 digits
        raise refuse(f"invalid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def _check_expansion(root: yaml.Node, file: str) -> None:
    """Refuse a document whose aliases expand past :data:`MAX_POLICY_NODES` values or refer to a
    node that contains them, before anything is constructed. Each distinct node is visited once
    (the sizes are memoised), so a 700-byte "billion laughs" costs its few dozen nodes."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise PolicyFileError(file, [PolicyIssue(
                file, "", "invalid YAML: an alias refers to a node that contains it", node.start_mark.line + 1)])
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total = min(total + size(child), MAX_POLICY_NODES + 1)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    if size(root) > MAX_POLICY_NODES:
        raise PolicyFileError(file, [PolicyIssue(
            file, "", f"the YAML expands to over {MAX_POLICY_NODES} values (aliases repeat their anchor's "
            "content); a policy is a page of YAML")])


def _nul_strings(data: Any, file: str, node: yaml.Node, loc: tuple = ()) -> list[PolicyIssue]:
    """Strings holding NUL (YAML's ``"\\0"``): neither a file path nor a PostgreSQL text can carry one."""
    if isinstance(data, str):
        return [PolicyIssue(file, _dotted(loc), "contains a NUL character", _line_of(node, loc))] if "\0" in data else []
    if isinstance(data, dict):
        return [i for k, v in data.items()
                for i in _nul_strings(k, file, node, loc) + _nul_strings(v, file, node, loc + (k,))]
    if isinstance(data, list):
        return [i for n, v in enumerate(data) for i in _nul_strings(v, file, node, loc + (n,))]
    return []


def _duplicate_keys(node: yaml.Node, file: str, path: tuple = ()) -> list[PolicyIssue]:
    """PyYAML keeps the last of two equal keys silently; a policy file must not say two things."""
    issues: list[PolicyIssue] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                issues.append(PolicyIssue(file, _dotted(path + (name,)), "duplicate key", key.start_mark.line + 1))
            seen.add(name)
            issues += _duplicate_keys(value, file, path + (name,))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            issues += _duplicate_keys(item, file, path + (i,))
    return issues


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """The line of the deepest YAML key along ``loc`` (a missing field: its parent's line)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _dotted(loc: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model validating the mapping at ``loc`` (skipping the keys of ``gears``)."""
    model: Any = Policy
    i = 0
    while i < len(loc):
        part = loc[i]
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        nxt = None
        union = typing.get_origin(ann) in (typing.Union, types.UnionType)
        for cand in [a for a in (typing.get_args(ann) if union else (ann,)) if a is not type(None)]:
            if typing.get_origin(cand) is dict:
                nxt, i = typing.get_args(cand)[1], i + 1  # skip the key
                break
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
                break
        if nxt is None:
            return None
        model = nxt
        i += 1
    return model


def _issue_from_error(err: dict, file: str, node: yaml.Node | None) -> PolicyIssue:
    # union members add type tags to loc ("list[str]", "literal['all-linear']"): not field names
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not re.search(r"[\[\]'(]", str(p)))
    reason = err["msg"]
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = f" (allowed: {', '.join(parent.model_fields)})" if parent else ""
        reason = f"unknown field{allowed}"
    elif err["type"] == "missing":
        reason = "required field is missing"
    elif reason.startswith("Value error, "):
        reason = reason[len("Value error, ") :]
    return PolicyIssue(file, _dotted(loc) or "(policy)", reason, _line_of(node, loc))


def _resolve_model_path(value: str, base_dir: Path | None) -> str:
    """``./x`` and ``../x`` are relative to the policy file's folder; ``~`` is expanded; hub ids stay."""
    if value.startswith("~"):
        return str(Path(value).expanduser())
    if base_dir is not None and value.startswith(("./", "../")):
        return str((base_dir / value).resolve())
    return value


def parse_policy(text: str, *, file: str, stem: str, base_dir: Path | None = None) -> Policy:
    """Validate one policy's YAML text; raise :class:`PolicyFileError` listing every issue."""
    data, node = _compose(text, file)
    if node is None:
        raise PolicyFileError(file, [PolicyIssue(file, "", "empty file: a policy is a YAML mapping")])
    if not isinstance(data, dict):
        kind = {list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false"}.get(
            type(data), "null" if data is None else type(data).__name__
        )
        raise PolicyFileError(file, [PolicyIssue(file, "", f"a policy is a YAML mapping, got {kind}", 1)])
    issues = _duplicate_keys(node, file) or _nul_strings(data, file, node)
    if issues:
        raise PolicyFileError(file, issues)
    data = dict(data)
    data.setdefault("name", stem)
    for key in ("teacher", "student"):
        if isinstance(data.get(key), str):
            try:
                data[key] = _resolve_model_path(data[key], base_dir)
            except RuntimeError as exc:  # "~nosuchuser/model": no such home directory
                issue = PolicyIssue(file, key, f"cannot expand {data[key]!r}: {exc}", _line_of(node, (key,)))
                raise PolicyFileError(file, [issue]) from None
    gears = data.get("gears") if isinstance(data.get("gears"), dict) else {}
    for gear_name, gear in gears.items():  # a gear's probe set is a path like the models'
        evl = gear.get("eval") if isinstance(gear, dict) else None
        if isinstance(evl, dict) and isinstance(evl.get("probe_set"), str):
            try:
                evl["probe_set"] = _resolve_model_path(evl["probe_set"], base_dir)
            except RuntimeError as exc:
                loc = ("gears", gear_name, "eval", "probe_set")
                issue = PolicyIssue(file, ".".join(map(str, loc)), f"cannot expand {evl['probe_set']!r}: {exc}",
                                    _line_of(node, loc))
                raise PolicyFileError(file, [issue]) from None
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise PolicyFileError(file, [_issue_from_error(e, file, node) for e in errors]) from None


def load_policy_file(path: str | Path) -> Policy:
    path = Path(path)
    file = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_POLICY_BYTES:
            raise PolicyFileError(file, [PolicyIssue(file, "", f"file is {size} bytes; a policy may be at most {MAX_POLICY_BYTES}")])
        with path.open("rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyFileError(file, [PolicyIssue(file, "", f"cannot read: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyFileError(file, [PolicyIssue(file, "", f"file is over {MAX_POLICY_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PolicyFileError(file, [PolicyIssue(file, "", f"not UTF-8 text (byte {exc.start})", line)]) from None
    return parse_policy(text, file=file, stem=path.stem, base_dir=path.parent)


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a folder: its own ``*.yaml``/``*.yml`` (not sub-folders, not hidden files)."""
    return sorted(
        p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


@dataclass
class LoadResult:
    policies: dict[Path, Policy] = field(default_factory=dict)
    errors: dict[Path, list[PolicyIssue]] = field(default_factory=dict)


def load_files(paths: list[Path], *, taken: dict[str, Path] | None = None) -> LoadResult:
    """Load each file; a file whose policy name is already used (by an earlier file) is an error."""
    result = LoadResult()
    owners: dict[str, Path] = dict(taken or {})
    for path in paths:
        try:
            policy = load_policy_file(path)
        except PolicyFileError as exc:
            result.errors[path] = exc.issues
            continue
        other = owners.get(policy.name)
        if other is not None and other != path:
            result.errors[path] = [PolicyIssue(str(path), "name", f"policy name {policy.name!r} is already used by {other}")]
            continue
        owners[policy.name] = path
        result.policies[path] = policy
    return result


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as given; folders replaced by their policy files."""
    out: list[Path] = []
    for p in paths:
        out += policy_files(p) if p.is_dir() else [p]
    return out


@dataclass
class ReloadReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # file -> issues; the policy that file held before (if any) keeps running
    errors: dict[str, list[PolicyIssue]] = field(default_factory=dict)
    kept_previous: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class PolicySet:
    """The daemon's current policies, loaded from one folder. :meth:`reload` is atomic per file:
    a file that fails validation keeps its previous version; a removed file's policy stops."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._by_file: dict[Path, Policy] = {}
        self.errors: dict[Path, list[PolicyIssue]] = {}

    @property
    def policies(self) -> dict[str, Policy]:
        return {p.name: p for p in sorted(self._by_file.values(), key=lambda p: p.name)}

    def get(self, name: str) -> Policy | None:
        return self.policies.get(name)

    def reload(self) -> ReloadReport:
        report = ReloadReport()
        before = self.policies
        files, problem = None, "policies folder does not exist"
        try:
            if self.directory.is_dir():
                files = policy_files(self.directory)
        except OSError as exc:  # a folder this user may not read
            problem = f"cannot read the policies folder: {exc.strerror or exc}"
        if files is None:
            issue = PolicyIssue(str(self.directory), "", f"{problem}; keeping the loaded policies")
            self.errors = {self.directory: [issue]}
            report.errors[str(self.directory)] = [issue]
            report.kept_previous = sorted(before)
            return report
        loaded = load_files(files)
        new_by_file = dict(loaded.policies)
        for path in loaded.errors:
            previous = self._by_file.get(path)
            taken = {p.name for p in new_by_file.values()}
            if previous is not None and previous.name not in taken:
                new_by_file[path] = previous
                report.kept_previous.append(previous.name)
        self._by_file = dict(sorted(new_by_file.items()))
        self.errors = loaded.errors
        report.errors = {str(p): issues for p, issues in loaded.errors.items()}
        after = self.policies
        for name, policy in after.items():
            if name not in before:
                report.added.append(name)
            elif before[name] != policy:
                report.changed.append(name)
            else:
                report.unchanged.append(name)
        report.removed = sorted(set(before) - set(after))
        return report
