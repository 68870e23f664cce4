"""``roost batch --engine spark``: the same job scored by Spark through ``mlflow.pyfunc.spark_udf``.

The model is the registry version's MLflow pyfunc (``roost.pyfunc``), loaded on each
executor by MLflow; the output has the local engine's columns (``plan.output_columns``).
Spark's own committer makes the output atomic (files appear on job commit, then
``_SUCCESS``); a failed Spark job is rerun as a whole (Spark retries tasks itself).

Point ``--master`` at a cluster (``spark://HOST:7077``) or at Kubernetes
(``k8s://https://API:443`` with ``spark.kubernetes.container.image`` set through
``SPARK_CONF_DIR`` or ``PYSPARK_SUBMIT_ARGS``); executors need roost installed (the serving
image has it). ``s3://`` paths are read as ``s3a://`` (hadoop-aws on the classpath).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from roost import config
from roost.batch import plan, runner, sources
from roost.config import Settings
from roost.errors import MissingTool


def spark_path(uri: str) -> str:
    """Spark (Hadoop) reads S3 through the s3a:// connector."""
    return "s3a://" + uri.removeprefix("s3://") if uri.startswith("s3://") else uri


def session(master: str) -> Any:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise MissingTool("--engine spark needs pyspark (pip install 'roost[spark]')") from None
    builder = (
        SparkSession.builder.master(master)
        .appName("roost-batch")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
    )
    if master.startswith("local"):
        # Local Python workers run this interpreter (roost, torch and mlflow are here), not
        # the first python3 on PATH.
        config.export_defaults(PYSPARK_PYTHON=sys.executable)
        builder = builder.config("spark.pyspark.python", sys.executable)
    return builder.getOrCreate()


def with_row_numbers(frame: Any) -> Any:
    """Add ``row``: the row number in the file, 0-based, without moving data to one partition.

    A file scan's partitions are in file order: row = rows in the partitions before + the
    position inside the partition (monotonically_increasing_id keeps that order).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    frame = frame.withColumn("_part", F.spark_partition_id()).withColumn(
        "_order", F.monotonically_increasing_id()
    )
    sizes = sorted(
        (int(r["_part"]), int(r["count"])) for r in frame.groupBy("_part").count().collect()
    )
    offsets: list[Any] = []
    total = 0
    for part, size in sizes:
        offsets += [F.lit(part), F.lit(total)]
        total += size
    position = F.row_number().over(Window.partitionBy("_part").orderBy("_order")) - 1
    offset = F.create_map(*offsets)[F.col("_part")] if offsets else F.lit(0)
    return frame.withColumn("row", offset + position).drop("_part", "_order")


def run(settings: Settings, input_uri: str, output_uri: str) -> dict[str, Any]:
    job = runner.prepare(settings, input_uri, output_uri)  # the same checks as the local engine
    spark = session(settings.batch.spark_master)
    with runner.Tracker(settings, job) as tracker:
        return _score(spark, settings, job, tracker)


def _score(
    spark: Any, settings: Settings, job: runner.Job, tracker: runner.Tracker
) -> dict[str, Any]:
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    spec = job.spec
    started = time.monotonic()
    frames = []
    for index, file in enumerate(job.files):
        path = spark_path(file.uri)
        if file.format == "parquet":
            frame = spark.read.parquet(path)
        elif file.format == "csv":
            frame = spark.read.option("header", True).option("multiLine", True).csv(path)
        else:
            frame = spark.read.json(path)
        frame = with_row_numbers(frame)
        row_id = (
            F.col(spec.id_column).cast("string") if spec.id_column else F.col("row").cast("string")
        )
        frames.append(
            frame.select(
                row_id.alias("id"),
                F.col("row").cast("long").alias("row"),
                F.col(spec.text_column).alias("text"),
                F.lit(file.uri).alias("source"),
                F.lit(index).alias("file_index"),
            )
        )
    rows = frames[0]
    for frame in frames[1:]:
        rows = rows.unionByName(frame)
    text_type = dict(rows.dtypes)["text"]
    if text_type != "string":
        reason = F.when(F.col("text").isNull(), plan.MISSING).otherwise(
            f"{plan.NON_STRING} ({text_type})"
        )
    else:
        reason = (
            F.when(F.col("text").isNull(), plan.MISSING)
            .when(F.trim(F.col("text")) == "", plan.EMPTY)
            .otherwise(F.lit(None))
        )
    rows = rows.withColumn("reason", reason).cache()
    good = rows.where(F.col("reason").isNull())
    bad = rows.where(F.col("reason").isNotNull())
    fields = ", ".join(
        ["label string", "confidence double"] + [f"prob_{label} double" for label in spec.labels]
    )
    udf = mlflow.pyfunc.spark_udf(
        spark, str(job.model.path), result_type=fields, env_manager="local"
    )
    # Sort before the UDF: the sort's sampling pass then reads the input, not the scores, so
    # the model runs once per row.
    ordered = good.orderBy("file_index", "row")
    scored = ordered.withColumn("scores", udf(F.struct(F.col("text").alias("text")))).select(
        "id",
        "row",
        "scores.*",
        F.lit(spec.model_version).alias("model_version"),
        F.lit(spec.model_run_id).alias("model_run_id"),
    )
    writer_format = "json" if spec.format == "jsonl" else spec.format
    out = spark_path(job.store.uri)
    options = {"header": "true"} if spec.format == "csv" else {}
    scored.write.mode("overwrite").options(**options).format(writer_format).save(out)
    bad_count = bad.count()
    total = rows.count()
    if bad_count:
        bad.select("id", "row", "source", "reason").orderBy("source", "row").write.mode(
            "overwrite"
        ).options(**options).format(writer_format).save(f"{out}/{plan.ERRORS_DIR}")
    counts = rows.groupBy("file_index").agg(
        F.count(F.lit(1)).alias("rows"), F.count("reason").alias("errors")
    )
    per_file = {int(r["file_index"]): (int(r["rows"]), int(r["errors"])) for r in counts.collect()}
    rows.unpersist()
    seconds = time.monotonic() - started
    job.store.write_json(plan.JOB_FILE, spec.to_dict())  # a rerun may overwrite this output
    files = [
        plan.FileResult(f.uri, sources.digest(f), f.size, *per_file.get(i, (0, 0)))
        for i, f in enumerate(job.files)
    ]
    summary = {
        "engine": "spark",
        "master": settings.batch.spark_master,
        "output": job.store.uri,
        "model": spec.model_name,
        "model_version": spec.model_version,
        "model_run_id": spec.model_run_id,
        "inputs": list(spec.inputs),
        "rows": total,
        "scored": total - bad_count,
        "errors": bad_count,
        "error_rate": round(plan.error_rate(total, bad_count), 6),
        "seconds": round(seconds, 3),
        "rows_per_s": round(total / seconds, 1) if seconds else 0.0,
        "columns": plan.output_columns(spec.labels),
        "succeeded": not plan.too_many_errors(total, bad_count, settings.batch.max_error_rate),
        "files": [f.to_dict() for f in files],
    }
    job.store.write_json(plan.MANIFEST_FILE, summary)
    result = runner.BatchResult(job.store.uri, spec, rows=total, errors=bad_count,
                                rows_this_run=total, seconds=seconds, manifest=summary,
                                finalized=True, succeeded=summary["succeeded"])  # fmt: skip
    tracker.record(result)
    summary["run_id"] = tracker.run_id
    if not summary["succeeded"]:
        raise runner.TooManyErrors(
            f"{bad_count} of {total} rows are bad ({summary['error_rate']:.2%} > "
            f"--max-error-rate {settings.batch.max_error_rate:.2%})"
        )
    return summary
