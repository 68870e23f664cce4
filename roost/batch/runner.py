"""The local engine of ``roost batch``: stream input chunks through the model, resumably.

Stages, in order:

1. check everything that can be checked before writing: the input files exist and have the
   text column, the model loads, the output is empty or holds this same job;
2. start an MLflow run (experiment ``batch.experiment``);
3. write ``_job.json``; for each file of each shard, for each chunk not yet recorded in
   ``_chunks/``: validate texts (bad rows to ``errors/``), run the batch kernel, write the
   chunk's part file, then its record; when a shard's files are done, write ``_shards/S``;
4. once every shard is recorded (all of them here, or the finalize step of the Kubernetes
   Job): write ``_manifest.json``, then ``_SUCCESS`` unless bad rows are above
   ``max_error_rate``;
5. log rows, errors, rows/s, inputs (URI, digest, rows) and the manifest to the run, and tag
   the model version with the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roost import storage
from roost.batch import plan, sink, sources
from roost.config import Settings
from roost.errors import ConfigError, DataError, NotFound, RoostError

log = logging.getLogger(__name__)

RUN_TAG = "roost.batch"
Progress = Callable[[int, "int | None"], None]  # (rows done, rows in all, if known)


class TooManyErrors(RoostError):
    """Bad rows above --max-error-rate: the job fails (its manifest says why)."""

    exit_code = 1
    http_status = 422


class IncompleteJob(RoostError):
    """Finalize found shards that have not finished."""

    exit_code = 1
    http_status = 409


# -- the model --------------------------------------------------------------------------------


@dataclass
class BatchModel:
    name: str
    version: str
    run_id: str
    uri: str
    labels: list[str]
    predict_proba: Callable[[list[str]], np.ndarray]
    registered: bool
    path: Path


def model_reference(settings: Settings, model: str) -> str:
    """A bare version number means that version of the registered model."""
    if model.isdigit():
        return f"models:/{settings.registry.model_name}/{model}"
    return model


def load_model(settings: Settings, model: str) -> BatchModel:
    """Resolve and load the model; any failure is one RoostError line."""
    import yaml

    from roost import registry, tokenizer
    from roost.classifier import TextClassifier
    from roost.serving import kernel

    ref = model_reference(settings, model)
    local = registry.fetch_model(settings, ref)
    try:
        classifier = TextClassifier.load(local.path)
    except NotFound:
        raise NotFound(f"cannot load model {ref}: no roost classifier under {local.path}") from None
    except Exception as exc:  # a corrupt file: json, torch, or a missing key
        raise DataError(f"cannot load model {ref}: {type(exc).__name__}: {exc}") from None
    run_id = ""
    mlmodel = local.path / "MLmodel"
    if mlmodel.is_file():
        run_id = str((yaml.safe_load(mlmodel.read_text()) or {}).get("run_id") or "")
    fast = kernel.Kernel(
        classifier.module,
        kernel.encoder_for(classifier.tokenizer, tokenizer.TOKEN_RE),
        classifier.num_classes,
    )
    return BatchModel(
        name=local.name or settings.registry.model_name,
        version=local.version or "local",
        run_id=run_id,
        uri=ref,
        labels=list(classifier.labels),
        predict_proba=fast.predict_proba,
        registered=local.version is not None,
        path=local.path,
    )


# -- one chunk ---------------------------------------------------------------------------------


@dataclass
class ScoredChunk:
    scores: Any  # Arrow table
    errors: Any | None  # Arrow table, None when the chunk has no bad rows
    rows: int
    bad: int


def score_chunk(
    raw: sources.RawChunk,
    source: str,
    model: BatchModel,
    forward_batch_size: int,
) -> ScoredChunk:
    """Validate a chunk's texts, score the good ones, list the bad ones with their reason."""
    texts: list[str] = []
    good_ids: list[str] = []
    good_rows: list[int] = []
    bad_ids: list[str] = []
    bad_rows: list[int] = []
    reasons: list[str] = []
    parse_errors = raw.parse_errors
    for offset, value in enumerate(raw.values):
        row = raw.first_row + offset
        row_id = raw.ids[offset]
        if row_id is None:
            row_id = str(row)
        reason = parse_errors[offset] if parse_errors is not None else None
        text = None
        if reason is None:
            text, reason = plan.classify(value)
        if text is None:
            bad_ids.append(row_id)
            bad_rows.append(row)
            reasons.append(reason or plan.MISSING)
        else:
            texts.append(text)
            good_ids.append(row_id)
            good_rows.append(row)
    parts = [
        model.predict_proba(texts[i : i + forward_batch_size])
        for i in range(0, len(texts), forward_batch_size)
    ]
    proba = np.concatenate(parts) if parts else np.zeros((0, len(model.labels)), dtype=np.float32)
    scores = sink.scores_table(
        good_ids, good_rows, model.labels, proba, model.version, model.run_id
    )
    errors = sink.errors_table(bad_ids, bad_rows, source, reasons) if bad_ids else None
    return ScoredChunk(scores, errors, len(raw.values), len(bad_ids))


def _with_last(items: Iterator[sources.RawChunk]) -> Iterator[tuple[sources.RawChunk, bool]]:
    """Each chunk with a flag: is it the file's last one (an empty file: one empty chunk)."""
    previous: sources.RawChunk | None = None
    for item in items:
        if previous is not None:
            yield previous, False
        previous = item
    yield (previous if previous is not None else sources.RawChunk(0, 0, [], [])), True


# -- the job ------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    output: str
    spec: plan.JobSpec
    run_id: str | None = None
    rows: int = 0
    errors: int = 0
    chunks_written: int = 0
    chunks_skipped: int = 0
    rows_this_run: int = 0
    seconds: float = 0.0
    shards_done: list[int] = field(default_factory=list)
    finalized: bool = False
    succeeded: bool = False
    manifest: dict[str, Any] | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "model": self.spec.model_name,
            "model_version": self.spec.model_version,
            "model_run_id": self.spec.model_run_id,
            "run_id": self.run_id,
            "inputs": list(self.spec.inputs),
            "rows": self.rows,
            "scored": self.rows - self.errors,
            "errors": self.errors,
            "error_rate": round(plan.error_rate(self.rows, self.errors), 6),
            "chunks_written": self.chunks_written,
            "chunks_skipped": self.chunks_skipped,
            "rows_this_run": self.rows_this_run,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_per_s, 1),
            "shards_done": self.shards_done,
            "finalized": self.finalized,
            "succeeded": self.succeeded,
            "manifest": (storage.join(self.output, plan.MANIFEST_FILE) if self.finalized else None),
        }


@dataclass
class Job:
    """A checked job: inputs listed, columns found, model loaded, output usable."""

    settings: Settings
    spec: plan.JobSpec
    files: list[sources.InputFile]
    model: BatchModel
    store: sink.OutputStore
    id_column: str | None


def prepare(settings: Settings, input_uri: str, output_uri: str) -> Job:
    """Everything that can fail before a byte is written: inputs, columns, model, output."""
    cfg = settings.batch
    files = sources.list_inputs(input_uri)
    id_column: str | None = None
    for index, file in enumerate(files):
        found = sources.check_columns(file, cfg.text_column, cfg.id_column)
        if index == 0:
            id_column = found
    model = load_model(settings, cfg.model)
    if cfg.shard_index is not None and cfg.shard_index >= cfg.shards:
        raise ConfigError(f"--shard-index {cfg.shard_index} is not in 0..{cfg.shards - 1}")
    spec = plan.JobSpec(
        inputs=tuple(f.uri for f in files),
        model_name=model.name,
        model_version=model.version,
        model_run_id=model.run_id,
        text_column=cfg.text_column,
        id_column=id_column,
        chunk_rows=cfg.chunk_rows,
        format=cfg.format,
        shards=cfg.shards,
        labels=tuple(model.labels),
    )
    store = sink.OutputStore(output_uri)
    existing = store.read_json(plan.JOB_FILE)
    if existing is not None:
        previous = plan.JobSpec.from_dict(existing)
        if previous != spec:
            raise ConfigError(
                f"{output_uri} holds another batch job (differs in: "
                f"{', '.join(spec.differences(previous))}); choose a new --output"
            )
    elif not store.is_empty():
        raise ConfigError(f"{output_uri} is not empty and holds no roost batch job")
    return Job(settings, spec, files, model, store, id_column)


def run(
    settings: Settings,
    input_uri: str,
    output_uri: str,
    progress: Progress | None = None,
) -> BatchResult:
    """Run (or resume) the job; finalize it when every shard is done."""
    job = prepare(settings, input_uri, output_uri)
    result = BatchResult(output_uri, job.spec)
    if job.store.exists(plan.SUCCESS_FILE):
        result.manifest = job.store.read_json(plan.MANIFEST_FILE)
        _fill_from_manifest(result)
        result.finalized = result.succeeded = True
        return result
    import torch

    from roost import proc

    torch.set_num_threads(settings.batch.threads or proc.cpu_limit())
    with Tracker(settings, job) as tracker:
        result.run_id = tracker.run_id
        try:
            _score(job, result, progress)
            if settings.batch.shard_index is None:
                finalize_job(job.store, job.spec, settings.batch.max_error_rate, result)
        finally:
            tracker.record(result)  # a job failed on its error rate has numbers too
    return result


def _fill_from_manifest(result: BatchResult) -> None:
    if result.manifest:
        result.rows = int(result.manifest["rows"])
        result.errors = int(result.manifest["errors"])


def _score(job: Job, result: BatchResult, progress: Progress | None) -> None:
    cfg = job.settings.batch
    spec = job.spec
    store = job.store
    if store.read_json(plan.JOB_FILE) is None:
        store.write_json(plan.JOB_FILE, spec.to_dict())
    shard_indices = range(spec.shards) if cfg.shard_index is None else [cfg.shard_index]
    done = set(store.names(plan.CHUNKS_DIR))
    finished_shards = set(store.names(plan.SHARDS_DIR))
    total = _known_total(job.files)
    rows_done = 0
    started = time.monotonic()
    for shard in shard_indices:
        if plan.shard_name(shard) in finished_shards:
            record = store.read_json(f"{plan.SHARDS_DIR}/{plan.shard_name(shard)}") or {}
            rows_done += sum(int(f["rows"]) for f in record.get("files", []))
            result.shards_done.append(shard)
            continue
        results = []
        for file_index in plan.shard_files(len(job.files), spec.shards, shard):
            file = job.files[file_index]
            records = []
            for raw, last in _with_last(
                sources.chunks(file, spec.text_column, job.id_column, spec.chunk_rows)
            ):
                key = plan.chunk_key(file_index, raw.chunk_index)
                if f"{key}.json" in done:
                    record = store.read_json(f"{plan.CHUNKS_DIR}/{key}.json")
                    if record is not None:
                        records.append(plan.ChunkRecord.from_dict(record))
                        result.chunks_skipped += 1
                        rows_done += len(raw.values)
                        _report(progress, rows_done, total)
                        continue
                records.append(_write_chunk(job, file_index, file, raw, last))
                result.chunks_written += 1
                result.rows_this_run += len(raw.values)
                rows_done += len(raw.values)
                result.seconds = time.monotonic() - started
                _report(progress, rows_done, total)
            results.append(
                plan.file_result(file.uri, sources.digest(file), file.size, records).to_dict()
            )
        store.write_json(
            f"{plan.SHARDS_DIR}/{plan.shard_name(shard)}",
            {"shard": shard, "fingerprint": spec.fingerprint(), "files": results},
        )
        result.shards_done.append(shard)
    result.seconds = time.monotonic() - started
    result.rows = rows_done


def _known_total(files: list[sources.InputFile]) -> int | None:
    if any(f.format != "parquet" for f in files):
        return None
    return sum(sources.total_rows(f) or 0 for f in files)


def _report(progress: Progress | None, rows: int, total: int | None) -> None:
    if progress is not None:
        progress(rows, total)


def _write_chunk(
    job: Job, file_index: int, file: sources.InputFile, raw: sources.RawChunk, last: bool
) -> plan.ChunkRecord:
    spec = job.spec
    cfg = job.settings.batch
    scored = score_chunk(raw, file.uri, job.model, cfg.forward_batch_size)
    name = plan.part_name(file_index, raw.chunk_index, spec.format)
    job.store.write(name, sink.encode(scored.scores, spec.format))
    errors_name = None
    if scored.errors is not None:
        errors_name = f"{plan.ERRORS_DIR}/{name}"
        job.store.write(errors_name, sink.encode(scored.errors, spec.format))
    record = plan.ChunkRecord(
        file_index, raw.chunk_index, raw.first_row, scored.rows, scored.bad, name, errors_name, last
    )
    # The record goes last: a chunk counts as done only once its files are all there.
    job.store.write_json(f"{plan.CHUNKS_DIR}/{plan.chunk_key(file_index, raw.chunk_index)}.json",
                         record.to_dict())  # fmt: skip
    return record


def finalize_job(
    store: sink.OutputStore,
    spec: plan.JobSpec,
    max_error_rate: float,
    result: BatchResult | None = None,
) -> dict[str, Any]:
    """Write the manifest, then ``_SUCCESS`` if bad rows are within ``max_error_rate``.

    Raises :class:`IncompleteJob` when a shard has not recorded its end, and
    :class:`TooManyErrors` (after writing the manifest, without ``_SUCCESS``).
    """
    present = set(store.names(plan.SHARDS_DIR))
    missing = [i for i in range(spec.shards) if plan.shard_name(i) not in present]
    if missing:
        raise IncompleteJob(
            f"{store.uri}: shard(s) {', '.join(map(str, missing))} of {spec.shards} not finished; "
            "rerun them (each resumes where it stopped)"
        )
    by_uri: dict[str, plan.FileResult] = {}
    for shard in range(spec.shards):
        record = store.read_json(f"{plan.SHARDS_DIR}/{plan.shard_name(shard)}") or {}
        for item in record.get("files", []):
            by_uri[item["uri"]] = plan.FileResult.from_dict(item)
    files = [by_uri[uri] for uri in spec.inputs if uri in by_uri]
    if len(files) != len(spec.inputs):
        raise IncompleteJob(f"{store.uri}: shard records do not cover every input file")
    document = plan.manifest(spec, store.uri, files, max_error_rate)
    store.write_json(plan.MANIFEST_FILE, document)
    if result is not None:
        result.manifest = document
        result.finalized = True
        result.rows = document["rows"]
        result.errors = document["errors"]
    if plan.too_many_errors(document["rows"], document["errors"], max_error_rate):
        raise TooManyErrors(
            f"{document['errors']} of {document['rows']} rows are bad "
            f"({document['error_rate']:.2%} > --max-error-rate {max_error_rate:.2%}); "
            f"see {store.join(plan.ERRORS_DIR)}/ (no {plan.SUCCESS_FILE} written)"
        )
    store.write(plan.SUCCESS_FILE, b"")
    if result is not None:
        result.succeeded = True
    return document


def finalize(settings: Settings, output_uri: str) -> dict[str, Any]:
    """The finalize step on its own (after the shards of a Kubernetes Job)."""
    store = sink.OutputStore(output_uri)
    existing = store.read_json(plan.JOB_FILE)
    if existing is None:
        raise NotFound(f"{output_uri} holds no roost batch job ({plan.JOB_FILE} missing)")
    return finalize_job(store, plan.JobSpec.from_dict(existing), settings.batch.max_error_rate)


# -- MLflow -------------------------------------------------------------------------------------


class Tracker:
    """The MLflow run of one `roost batch` invocation (one attempt of one shard or of all)."""

    def __init__(self, settings: Settings, job: Job) -> None:
        self.settings = settings
        self.job = job
        self.run_id: str | None = None

    def __enter__(self) -> Tracker:
        import mlflow

        from roost import tracking

        tracking.use(self.settings)
        mlflow.set_experiment(self.settings.batch.experiment)
        spec = self.job.spec
        cfg = self.settings.batch
        run = mlflow.start_run(
            run_name=f"batch-{spec.model_name}-v{spec.model_version}",
            tags={
                "roost.kind": "batch",
                f"{RUN_TAG}.fingerprint": spec.fingerprint(),
                f"{RUN_TAG}.output": self.job.store.uri,
                f"{RUN_TAG}.shard": "all" if cfg.shard_index is None else str(cfg.shard_index),
            },
        )
        self.run_id = run.info.run_id
        mlflow.log_params(
            {
                "model_uri": self.job.model.uri,
                "model_name": spec.model_name,
                "model_version": spec.model_version,
                "model_run_id": spec.model_run_id,
                "input": ",".join(spec.inputs)[:6000],
                "input_files": len(spec.inputs),
                "output": self.job.store.uri,
                "text_column": spec.text_column,
                "id_column": spec.id_column or "(row number)",
                "chunk_rows": spec.chunk_rows,
                "format": spec.format,
                "shards": spec.shards,
                "max_error_rate": cfg.max_error_rate,
            }
        )
        return self

    def record(self, result: BatchResult) -> None:
        import mlflow

        mlflow.log_metrics(
            {
                "rows": result.rows,
                "errors": result.errors,
                "error_rate": plan.error_rate(result.rows, result.errors),
                "rows_this_run": result.rows_this_run,
                "rows_per_s": result.rows_per_s,
                "seconds": result.seconds,
                "chunks_written": result.chunks_written,
                "chunks_skipped": result.chunks_skipped,
            }
        )
        if result.manifest is not None:
            mlflow.log_dict(result.manifest, "batch/manifest.json")
            _log_inputs(result.manifest)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        import mlflow

        mlflow.end_run("FINISHED" if exc_type is None else "FAILED")
        if self.run_id is not None and self.job.model.registered:
            _tag_version(self.settings, self.job, self.run_id, exc_type is None)


def _log_inputs(manifest: dict[str, Any]) -> None:
    """Each input file as an MLflow dataset input: its URI, digest and row count."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for item in manifest["files"]:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(item["uri"])
        dataset = MetaDataset(  # type: ignore[abstract]
            source=source,
            name=item["uri"].rstrip("/").rsplit("/", 1)[-1],
            digest=item["digest"].split(":", 1)[-1][:36],
        )
        mlflow.log_input(dataset, context="batch", tags={"rows": str(item["rows"])})


def _tag_version(settings: Settings, job: Job, run_id: str, succeeded: bool) -> None:
    """Tag the model version with the batch run, so the registry shows where it was used."""
    from roost import registry, tracking

    uri = tracking.resolve_uri(settings)
    versions = registry.Registry(uri, job.spec.model_name)
    versions.set_tags(
        job.spec.model_version,
        {
            f"{RUN_TAG}.run.{run_id}": job.store.uri,
            f"{RUN_TAG}.last_run": run_id,
            f"{RUN_TAG}.last_output": job.store.uri,
            f"{RUN_TAG}.last_status": "succeeded" if succeeded else "failed",
        },
    )
