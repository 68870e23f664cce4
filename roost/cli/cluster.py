"""Kubernetes and AWS commands: ``roost deploy``, ``roost aws ...``, ``roost train --on k8s``."""

from __future__ import annotations

import typer

aws_app = typer.Typer(no_args_is_help=True, help="AWS set-up for EKS (S3 artifact bucket, IAM policy).")
