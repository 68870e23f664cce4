"""Batch predictions: ``roost batch`` scores files (local or S3) with a model version.

``plan`` (what a job is, pure), ``sources`` (reading input chunks), ``sink`` (writing
output atomically), ``runner`` (the local engine and the finalize step), ``k8s`` (the
Indexed Job), ``spark`` (the Spark engine).
"""
