"""Where a rollout's state lives, and the rules for writing it.

Two stores keep the same JSON document: a file beside the local proxy's config
(:class:`FileStore`) and an annotation on the InferenceService (``backends/kserve.py``).
Both give the same guarantees:

- **create** refuses a second rollout while one is in flight (:class:`roost.errors.Conflict`);
- **save** is a compare-and-swap on ``revision``: a driver whose copy is stale gets Conflict
  instead of overwriting a newer state;
- manual overrides go to a separate document (``command``), so an operator never races
  the driver for the state itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from roost.errors import Conflict
from roost.rollout.state import Command, RolloutState

ANNOTATION_PREFIX = "rollout.roost.io"
STATE_ANNOTATION = f"{ANNOTATION_PREFIX}/state"
COMMAND_ANNOTATION = f"{ANNOTATION_PREFIX}/command"


def in_flight_message(state: RolloutState) -> str:
    return (
        f"a rollout of {state.model} v{state.version} is already in flight (id {state.id}, "
        f"{state.phase.value} at {state.weight}%, driven by {state.owner or 'nobody'}): "
        f"see `roost rollout status {state.model}`, continue it with `roost rollout resume "
        f"{state.model}`, or end it with `roost rollout abort {state.model}`"
    )


def refuse_if_in_flight(current: RolloutState | None, new: RolloutState) -> int:
    """Raise Conflict if ``current`` is in flight; else the revision ``new`` is stored under."""
    if current is not None and not current.terminal:
        raise Conflict(in_flight_message(current))
    return (current.revision if current is not None else 0) + 1


def check_revision(current: RolloutState | None, state: RolloutState) -> None:
    if current is None or current.id != state.id:
        raise Conflict(f"rollout {state.id} of {state.model} was replaced by another")
    if current.revision != state.revision:
        raise Conflict(
            f"rollout {state.id} of {state.model} changed since it was read "
            f"(revision {current.revision}, ours {state.revision})"
        )


@contextlib.contextmanager
def file_lock(lock_file: Path) -> Iterator[None]:
    """An exclusive flock on ``lock_file`` (created with its directory), across processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that a reader (or a crash) sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


class FileStore:
    """The rollout state as ``state.json`` (and ``command.json``) in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state_file = directory / "state.json"
        self.command_file = directory / "command.json"
        self.lock_file = directory / ".lock"
        self.archive = directory / "history"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with file_lock(self.lock_file):
            yield

    def _read(self) -> RolloutState | None:
        try:
            return RolloutState.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def load(self) -> RolloutState | None:
        with self.locked():
            return self._read()

    def create(self, state: RolloutState) -> RolloutState:
        with self.locked():
            current = self._read()
            revision = refuse_if_in_flight(current, state)
            if current is not None:
                self.archive.mkdir(exist_ok=True)
                atomic_write(self.archive / f"{current.id}.json", current.dumps())
            stored = dataclasses.replace(state, revision=revision)
            atomic_write(self.state_file, stored.dumps())
            return stored

    def save(self, state: RolloutState) -> RolloutState:
        with self.locked():
            check_revision(self._read(), state)
            stored = dataclasses.replace(state, revision=state.revision + 1)
            atomic_write(self.state_file, stored.dumps())
            return stored

    def read_command(self) -> Command | None:
        try:
            return Command.from_dict(json.loads(self.command_file.read_text()))
        except FileNotFoundError:
            return None

    def write_command(self, command: Command) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.command_file, json.dumps(command.to_dict()))
