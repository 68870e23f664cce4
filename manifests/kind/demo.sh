#!/usr/bin/env bash
# The kind demo (make kind-demo): train as a Job -> register and gate -> deploy the version
# (REST and gRPC InferenceServices) -> predict through Kourier on localhost:8080 -> helm test.
# Needs the cluster of `make kind-up` and the roost CLI (ROOST, default .venv/bin/roost).
set -euo pipefail

ROOST="${ROOST:-.venv/bin/roost}"
NAMESPACE="${NAMESPACE:-roost}"
RELEASE="${RELEASE:-roost}"
EPOCHS="${EPOCHS:-3}"
INGRESS_PORT="${INGRESS_PORT:-8080}"
MLFLOW_PORT="${MLFLOW_PORT:-15000}"
DOMAIN="${DOMAIN:-127.0.0.1.sslip.io}"
export ROOST_K8S__NAMESPACE="${NAMESPACE}"

say() { printf '\n>> %s\n' "$*"; }

say "1/6 MLflow on 127.0.0.1:${MLFLOW_PORT} (kubectl port-forward svc/${RELEASE}-mlflow)"
kubectl -n "${NAMESPACE}" port-forward "svc/${RELEASE}-mlflow" "${MLFLOW_PORT}:5000" >/dev/null 2>&1 &
forward=$!
trap 'kill "${forward}" 2>/dev/null || true' EXIT
export MLFLOW_TRACKING_URI="http://127.0.0.1:${MLFLOW_PORT}"
for _ in $(seq 60); do
  "${ROOST}" mlflow status >/dev/null 2>&1 && break
  sleep 1
done
"${ROOST}" mlflow status

say "2/6 train: a Job from the chart's template, logs streamed, its run found in MLflow by tag"
"${ROOST}" train --on k8s --epochs "${EPOCHS}" --max-rows 6000

say "3/6 register the run's model and gate it (promote -> @champion)"
version="$("${ROOST}" promote --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])')"
echo "registered version ${version}"

say "4/6 deploy version ${version}: InferenceServices sentiment (REST) and sentiment-grpc (h2c)"
"${ROOST}" deploy --version "${version}"
"${ROOST}" deploy --version "${version}" --protocol grpc

say "5/6 predict through Kourier: REST v2, REST v1, gRPC v2"
rest="http://sentiment-predictor.${NAMESPACE}.${DOMAIN}:${INGRESS_PORT}"
grpc="sentiment-grpc-predictor.${NAMESPACE}.${DOMAIN}:${INGRESS_PORT}"
"${ROOST}" predict --url "${rest}" --protocol v2 "the flight was great" "lost my bag again"
"${ROOST}" predict --url "${rest}" --protocol v1 "the crew was friendly"
"${ROOST}" predict --grpc-target "${grpc}" --protocol grpc "two hours late and no food"

say "6/6 helm test ${RELEASE}: the model's v2 ready endpoint from inside the cluster"
helm test "${RELEASE}" --namespace "${NAMESPACE}" --logs

say "done: MLflow UI at ${MLFLOW_TRACKING_URI} while this runs; kubectl -n ${NAMESPACE} port-forward svc/${RELEASE}-mlflow 5000:5000 later"
