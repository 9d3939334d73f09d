"""Program storage: an optimized program as DSPy's own JSON, plus metadata and history.

A :class:`ProgramRecord` holds exactly what ``program.save("x.json")`` writes (so plain
DSPy loads it) with the job, scores, LM, versions, dataset fingerprints and predictor
signatures it came from, and the run's trial log. A :class:`ProgramStore` keeps records:
:class:`DatabaseProgramStore` (the default) or :class:`DirectoryProgramStore`;
:func:`get_store` returns the configured one. :func:`build_program` turns a record back
into a ready ``dspy.Module``.
"""

from __future__ import annotations

import pathlib

from dmipro import config
from dmipro.storage.base import ProgramStore, StoredProgram
from dmipro.storage.database import DatabaseProgramStore
from dmipro.storage.directory import DirectoryProgramStore
from dmipro.storage.files import export_program, read_program_file, record_from_dspy_state
from dmipro.storage.program import (
    build_program,
    check_signatures,
    instantiate,
    lm_info,
    predictor_signatures,
    program_state,
    state_bytes,
)
from dmipro.storage.record import (
    DSPY_FORMAT,
    FORMAT,
    MAX_DOCUMENT_BYTES,
    ProgramMetadata,
    ProgramRecord,
    dmipro_version,
)

__all__ = [
    "DSPY_FORMAT",
    "FORMAT",
    "MAX_DOCUMENT_BYTES",
    "DatabaseProgramStore",
    "DirectoryProgramStore",
    "ProgramMetadata",
    "ProgramRecord",
    "ProgramStore",
    "StoredProgram",
    "build_program",
    "check_signatures",
    "dmipro_version",
    "export_program",
    "get_store",
    "instantiate",
    "lm_info",
    "predictor_signatures",
    "program_state",
    "read_program_file",
    "record_from_dspy_state",
    "state_bytes",
]


# Here rather than in base.py (as optuna's ``get_storage`` sits in ``optuna.storages``): the
# base class stays below its backends, and only the package knows them all.
def get_store(storage: str | None = None) -> ProgramStore:
    """The store named by ``storage`` (default: the ``storage`` setting): ``"db"`` or a directory."""
    target = storage if storage is not None else config.get_settings().storage
    if target == "db":
        return DatabaseProgramStore()
    return DirectoryProgramStore(pathlib.Path(target).expanduser())
