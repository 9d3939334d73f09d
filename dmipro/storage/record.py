"""The stored form of an optimized program: DSPy's JSON, its metadata and the run's history.

A :class:`ProgramRecord` is a frozen value object. ``to_dspy_json()`` gives the export
file: exactly what ``program.save("x.json")`` writes, with dmipro's metadata and history
inside DSPy's own ``metadata`` object, which DSPy's ``program.load(path)`` ignores::

    {"predict": {...}, "metadata": {"dependency_versions": {...},
                                    "dmipro": {"format": "dmipro.program/v2", "metadata": {...},
                                               "history": [...]}}}

``to_json()`` gives the stored form (and dmipro's earlier export format)

    {"format": "dmipro.program/v1", "metadata": {...}, "program": <DSPy JSON>, "history": [...]}

``from_json()`` reads either back, raising :class:`~dmipro.errors.DecodeError` for
anything that is not exactly one of those shapes.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmipro.errors import DecodeError
from dmipro.refs import is_ref, ref_of
from dmipro.storage._state import lm_info, predictor_signatures, program_state

if TYPE_CHECKING:
    import dspy

__all__ = [
    "DSPY_FORMAT",
    "FORMAT",
    "MAX_DOCUMENT_BYTES",
    "ProgramMetadata",
    "ProgramRecord",
    "MAX_HISTORY_BYTES",
    "MAX_HISTORY_ENTRIES",
    "check_program_state",
    "dmipro_version",
    "state_predictors",
    "strip_predictor_lms",
]

log = logging.getLogger(__name__)

FORMAT = "dmipro.program/v1"
"""Format marker of a stored program document (and of dmipro's earlier export files)."""

DSPY_FORMAT = "dmipro.program/v2"
"""Format marker of an export: DSPy's own program file, dmipro's part under ``metadata.dmipro``."""

_DSPY_KEYS = frozenset({"format", "metadata", "history"})

MAX_DOCUMENT_BYTES = 32 * 1024 * 1024
"""Largest program document read from a file or a store (32 MiB)."""

MAX_HISTORY_ENTRIES = 10_000
"""Most trial-history entries a stored program may carry (a heavy run logs a few hundred)."""

MAX_HISTORY_BYTES = 4 * 1024 * 1024
"""Largest trial history, as compact JSON (4 MiB): bytes parse into many times their size in objects."""

_BUILTIN_LM_CLASS = "dspy.clients.lm.LM"
_PREDICTOR_KEYS = frozenset({"traces", "train", "demos", "signature", "lm", "fields"})


def dmipro_version() -> str:
    """The installed dmipro version, or ``"0+unknown"`` when running from a source tree."""
    try:
        return importlib.metadata.version("dmipro")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _plain_json(value: Any, what: str) -> Any:
    try:
        return orjson.loads(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ValueError(f"{what} must be plain JSON ({exc})") from None


Short = Annotated[str, Field(max_length=200)]


class PredictorFields(BaseModel):
    """Input and output field names of one predictor's signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[Annotated[str, Field(max_length=200)]]
    outputs: list[Annotated[str, Field(max_length=200)]]


class ProgramMetadata(BaseModel):
    """What is known about how a stored program was made.

    ``program_ref`` rebuilds the module (``package.module:attr``: an instance, a class or a
    zero-argument factory); ``signatures`` hold each predictor's field names so a changed
    signature is caught on load; ``lm`` holds the model and non-secret parameters only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    program_ref: Annotated[str, Field(max_length=300)]
    job_id: Annotated[str, Field(max_length=64)] | None = None
    optimizer: dict[str, Any] = Field(default_factory=dict)
    baseline_score: float | None = None
    best_score: float | None = None
    lm: dict[str, Any] | None = None
    dspy_version: Short
    dmipro_version: Short
    datasets: dict[Short, Short] = Field(default_factory=dict)
    signatures: dict[Annotated[str, Field(max_length=500)], PredictorFields] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("program_ref")
    @classmethod
    def _ref_shape(cls, value: str) -> str:
        if not is_ref(value):
            raise ValueError(f"{value!r} is not a 'package.module:attr' reference")
        return value

    @field_validator("lm")
    @classmethod
    def _lm_without_secrets(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return lm_info(value)

    @field_validator("optimizer", "extra")
    @classmethod
    def _json(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _plain_json(value, "value")  # type: ignore[no-any-return]

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def state_predictors(state: Mapping[str, Any]) -> dict[str, Any]:
    """The predictor entries of a saved state, by name; a bare ``Predict``'s flat state is ``"self"``."""
    if isinstance(state.get("signature"), Mapping) and isinstance(state.get("demos"), list):
        return {"self": {k: v for k, v in state.items() if k != "metadata"}}
    return {k: v for k, v in state.items() if k != "metadata"}


def strip_predictor_lms(state: dict[str, Any]) -> list[str]:
    """Set every predictor's saved ``lm`` in ``state`` to null; returns the names that had one.

    A program file decides prompts and demos, never where they are sent: a saved LM (its
    model, key, ``store``, ``n``) would override the app's ``dspy.configure(lm=...)`` and send
    the app's prompts to the file author's account. The app's configuration decides.
    """
    flat = isinstance(state.get("signature"), Mapping) and isinstance(state.get("demos"), list)
    entries = {"self": state} if flat else {k: v for k, v in state.items() if k != "metadata"}
    stripped = []
    for name, pstate in entries.items():
        if isinstance(pstate, dict) and pstate.get("lm") is not None:
            pstate["lm"] = None
            stripped.append(name)
    return stripped


def check_program_state(state: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``state`` has the shape of DSPy's saved-program JSON."""
    meta = state.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("dependency_versions"), Mapping):
        raise ValueError("the program has no metadata.dependency_versions (DSPy's save always writes it)")
    if not all(isinstance(v, str) for v in meta["dependency_versions"].values()):
        raise ValueError("metadata.dependency_versions must map names to version strings")
    predictors = state_predictors(state)
    if not predictors:
        raise ValueError("the program has no predictors")
    for name, pstate in predictors.items():
        _check_predictor(name, pstate)


def _check_predictor(name: str, pstate: Any) -> None:
    where = f"predictor {name!r}"
    if not isinstance(pstate, Mapping):
        raise ValueError(f"{where} must be an object, got {type(pstate).__name__}")
    unknown = sorted(set(pstate) - _PREDICTOR_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(unknown)}")
    sig = pstate.get("signature")
    if not isinstance(sig, Mapping) or not isinstance(sig.get("instructions"), str):
        raise ValueError(f"{where}: signature.instructions must be a string")
    fields = sig.get("fields")
    if not isinstance(fields, list) or not all(
        isinstance(f, Mapping) and isinstance(f.get("prefix"), str) and isinstance(f.get("description"), str)
        for f in fields
    ):
        raise ValueError(f"{where}: signature.fields must be a list of {{prefix, description}} strings")
    for key in ("demos", "traces", "train"):
        if not isinstance(pstate.get(key, []), list):
            raise ValueError(f"{where}: {key} must be a list")
    if not all(isinstance(d, Mapping) for d in pstate.get("demos", [])):
        raise ValueError(f"{where}: every demo must be an object")
    lm = pstate.get("lm")
    if lm is not None:
        if not isinstance(lm, Mapping):
            raise ValueError(f"{where}: lm must be null or an object")
        cls_path = lm.get("_dspy_lm_class", _BUILTIN_LM_CLASS)
        if cls_path != _BUILTIN_LM_CLASS:
            raise ValueError(
                f"{where}: LM class {cls_path!r} is not dspy.LM; dmipro loads no custom LM classes"
            )
        for key in ("engine", "async_engine"):
            if key in lm and not isinstance(lm[key], str | None):
                raise ValueError(f"{where}: a custom LM {key} (a class reference) is not loaded by dmipro")


class ProgramRecord(BaseModel):
    """An optimized program as stored: DSPy's JSON (``program``), ``metadata`` and ``history``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metadata: ProgramMetadata
    program: dict[str, Any]
    history: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("program")
    @classmethod
    def _program_shape(cls, value: dict[str, Any]) -> dict[str, Any]:
        value = _plain_json(value, "program")
        check_program_state(value)
        stripped = strip_predictor_lms(value)
        if stripped:
            log.warning("dropped the saved LM of predictor(s) %s: the app's dspy.configure(lm=...) decides "
                        "where prompts go", ", ".join(stripped))
        return value

    @field_validator("history", mode="before")
    @classmethod
    def _history_json(cls, value: Any) -> Any:
        # Checked before pydantic builds its own copy: the cap is what bounds memory.
        if not isinstance(value, list):
            return value
        if len(value) > MAX_HISTORY_ENTRIES:
            raise ValueError(f"the history has {len(value)} entries; at most {MAX_HISTORY_ENTRIES} are kept")
        try:
            data = orjson.dumps(value)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise ValueError(f"history must be plain JSON ({exc})") from None
        if len(data) > MAX_HISTORY_BYTES:
            raise ValueError(f"the history is {len(data)} bytes of JSON; at most {MAX_HISTORY_BYTES}")
        return orjson.loads(data)

    @model_validator(mode="after")
    def _signatures_match_state(self) -> ProgramRecord:
        saved = set(state_predictors(self.program))
        names = set(self.metadata.signatures)
        if not names <= saved:
            missing = ", ".join(sorted(names - saved))
            raise ValueError(f"metadata.signatures names predictors the program does not have: {missing}")
        return self

    @classmethod
    def from_program(
        cls,
        program: dspy.Module,
        *,
        program_ref: str | object,
        job_id: str | None = None,
        optimizer: Mapping[str, Any] | None = None,
        baseline_score: float | None = None,
        best_score: float | None = None,
        lm: Any = None,
        datasets: Mapping[str, str] | None = None,
        history: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> ProgramRecord:
        """Capture ``program`` with its metadata.

        ``program_ref`` is a ``package.module:attr`` string or the importable object itself
        (the factory, class or module instance that rebuilds ``program``); ``lm`` is a
        ``dspy.LM`` or a dict, stored without secrets.
        """
        import dspy

        ref = program_ref if isinstance(program_ref, str) else ref_of(program_ref, field="program")
        metadata = ProgramMetadata(
            program_ref=ref,
            job_id=job_id,
            optimizer=dict(optimizer or {}),
            baseline_score=baseline_score,
            best_score=best_score,
            lm=lm_info(lm),
            dspy_version=dspy.__version__,
            dmipro_version=dmipro_version(),
            datasets=dict(datasets or {}),
            signatures=predictor_signatures(program),  # type: ignore[arg-type]
            extra=dict(extra or {}),
        )
        return cls(
            metadata=metadata, program=program_state(program), history=[dict(h) for h in history or []]
        )

    def to_json(self) -> dict[str, Any]:
        """The export document: format marker, metadata, DSPy's program JSON, history."""
        return {
            "format": FORMAT,
            "metadata": self.metadata.model_dump(mode="json"),
            "program": self.program,
            "history": self.history,
        }

    def to_bytes(self) -> bytes:
        """The stored document as indented JSON bytes."""
        return orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)

    def to_dspy_json(self) -> dict[str, Any]:
        """The export file: DSPy's ``program.save()`` JSON, dmipro's part in ``metadata.dmipro``."""
        document = dict(self.program)
        document["metadata"] = {
            **dict(document.get("metadata") or {}),
            "dmipro": {
                "format": DSPY_FORMAT,
                "metadata": self.metadata.model_dump(mode="json"),
                "history": self.history,
            },
        }
        return document

    def to_dspy_bytes(self) -> bytes:
        """The export file as indented JSON bytes (what ``program.save()`` writes, plus dmipro's part)."""
        return orjson.dumps(self.to_dspy_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def from_json(cls, document: Any, *, program_ref: str | None = None) -> ProgramRecord:
        """Read an export document; ``program_ref`` overrides the stored reference.

        Raises :class:`DecodeError` naming the first problem when ``document`` is not a
        ``dmipro.program/v1`` document of the right shape.
        """
        if not isinstance(document, Mapping):
            raise DecodeError(f"a program document must be a JSON object, got {type(document).__name__}")
        document = unwrap_dspy_export(document)
        marker = document.get("format")
        if marker != FORMAT:
            raise DecodeError(f"unsupported program format {marker!r}; expected {FORMAT!r}")
        unknown = sorted(set(document) - {"format", "metadata", "program", "history"})
        if unknown:
            raise DecodeError(f"unknown keys in program document: {', '.join(map(str, unknown))}")
        metadata = document.get("metadata")
        if program_ref is not None and isinstance(metadata, Mapping):
            metadata = {**metadata, "program_ref": program_ref}
        try:
            return cls.model_validate(
                {
                    "metadata": metadata,
                    "program": document.get("program"),
                    "history": document.get("history", []),
                }
            )
        except ValidationError as exc:
            raise DecodeError(f"not a valid program document: {_first_error(exc)}") from None

    @classmethod
    def from_bytes(cls, data: bytes, *, program_ref: str | None = None) -> ProgramRecord:
        """Parse and read an export document from JSON bytes."""
        if len(data) > MAX_DOCUMENT_BYTES:
            raise DecodeError(f"program document is {len(data)} bytes; the limit is {MAX_DOCUMENT_BYTES}")
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"program document is not JSON ({exc})") from None
        return cls.from_json(document, program_ref=program_ref)


def is_dspy_export(document: Mapping[str, Any]) -> bool:
    """Whether ``document`` is a DSPy program file carrying dmipro's part (an export)."""
    metadata = document.get("metadata")
    return "format" not in document and isinstance(metadata, Mapping) and "dmipro" in metadata


def unwrap_dspy_export(document: Mapping[str, Any]) -> Mapping[str, Any]:
    """An export file in the stored shape (``format``, ``metadata``, ``program``, ``history``).

    Anything that is not an export is returned as it is.
    """
    if not is_dspy_export(document):
        return document
    part = document["metadata"]["dmipro"]
    if not isinstance(part, Mapping):
        raise DecodeError("metadata.dmipro must be a JSON object")
    if part.get("format") != DSPY_FORMAT:
        raise DecodeError(f"unsupported program format {part.get('format')!r}; expected {DSPY_FORMAT!r}")
    unknown = sorted(set(part) - _DSPY_KEYS)
    if unknown:
        raise DecodeError(f"unknown keys in metadata.dmipro: {', '.join(map(str, unknown))}")
    dspy_metadata = {k: v for k, v in document["metadata"].items() if k != "dmipro"}
    return {
        "format": FORMAT,
        "metadata": part.get("metadata"),
        "program": {**document, "metadata": dspy_metadata},
        "history": part.get("history", []),
    }


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
