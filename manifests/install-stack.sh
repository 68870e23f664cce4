#!/usr/bin/env bash
# Install what roost's chart runs on, at the versions KServe v0.20.0 is tested with:
# cert-manager, the Knative operator + Knative Serving with Kourier, KServe in Knative
# (serverless) mode with its ClusterServingRuntimes, and manifests/overlays/<platform>.
#
#   manifests/install-stack.sh kind|eks          (make kind-up / make eks-up call it)
#
# Versions come from the environment (the Makefile pins them); re-running is safe.
set -euo pipefail

PLATFORM="${1:-}"
CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.17.0}"
KNATIVE_OPERATOR_VERSION="${KNATIVE_OPERATOR_VERSION:-v1.21.1}"
KNATIVE_SERVING_VERSION="${KNATIVE_SERVING_VERSION:-1.21.1}"
KSERVE_VERSION="${KSERVE_VERSION:-v0.20.0}"
KOURIER_NODE_PORT="${KOURIER_NODE_PORT:-31080}"
# The domain of the InferenceServices' URLs (Knative's config-domain in overlays/<platform>).
if [[ "${PLATFORM:-}" == kind ]]; then DEFAULT_DOMAIN=127.0.0.1.sslip.io; else DEFAULT_DOMAIN=example.com; fi
INGRESS_DOMAIN="${INGRESS_DOMAIN:-${DEFAULT_DOMAIN}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KSERVE_RELEASE="https://github.com/kserve/kserve/releases/download/${KSERVE_VERSION}"

say() { printf '>> %s\n' "$*"; }
die() { printf 'install-stack: %s\n' "$*" >&2; exit 1; }

case "${PLATFORM}" in
  kind | eks) ;;
  *) die "usage: install-stack.sh kind|eks" ;;
esac
for tool in kubectl helm python3; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} not found: install it first (see README, Run on kind)"
done
kubectl version --request-timeout=10s >/dev/null 2>&1 || die "no cluster answers: check 'kubectl config current-context'"
grep -q "version: \"${KNATIVE_SERVING_VERSION}\"" "${HERE}/base/knative-serving.yaml" ||
  die "manifests/base/knative-serving.yaml does not pin Knative Serving ${KNATIVE_SERVING_VERSION}"

say "cert-manager ${CERT_MANAGER_VERSION}"
helm upgrade --install cert-manager cert-manager \
  --repo https://charts.jetstack.io --version "${CERT_MANAGER_VERSION}" \
  --namespace cert-manager --create-namespace --set crds.enabled=true --wait --timeout 10m

say "Knative operator ${KNATIVE_OPERATOR_VERSION}"
helm upgrade --install knative-operator \
  "https://github.com/knative/operator/releases/download/knative-${KNATIVE_OPERATOR_VERSION}/knative-operator-${KNATIVE_OPERATOR_VERSION}.tgz" \
  --namespace knative-operator --create-namespace --wait --timeout 10m

say "namespaces and Knative Serving ${KNATIVE_SERVING_VERSION} with Kourier (manifests/overlays/${PLATFORM})"
selector=()
if ! kubectl get crd podmonitors.monitoring.coreos.com >/dev/null 2>&1; then
  say "no Prometheus operator (PodMonitor CRD): leaving the PodMonitor out"
  selector=(--selector 'roost.io/optional!=prometheus')
fi
kubectl apply --server-side -k "${HERE}/overlays/${PLATFORM}" ${selector[@]+"${selector[@]}"}
kubectl -n knative-serving wait knativeserving/knative-serving --for=condition=Ready --timeout=10m

if [[ "${PLATFORM}" == kind ]]; then
  say "Kourier HTTP on NodePort ${KOURIER_NODE_PORT} (localhost:8080 through manifests/kind/cluster.yaml)"
  kubectl -n knative-serving patch service kourier --type strategic \
    -p "{\"spec\":{\"ports\":[{\"port\":80,\"nodePort\":${KOURIER_NODE_PORT}}]}}"
fi

say "KServe ${KSERVE_VERSION} (Knative mode)"
kubectl apply --server-side --force-conflicts -f "${KSERVE_RELEASE}/kserve-crds.yaml"
kubectl wait --for=condition=Established --timeout=2m \
  crd/inferenceservices.serving.kserve.io crd/servingruntimes.serving.kserve.io \
  crd/clusterservingruntimes.serving.kserve.io
kubectl apply --server-side --force-conflicts -f "${KSERVE_RELEASE}/kserve.yaml"
kubectl -n kserve rollout status deployment/kserve-controller-manager --timeout=10m

say "KServe: Kourier instead of Istio (no top-level virtual service), domain ${INGRESS_DOMAIN}"
ingress="$(kubectl -n kserve get configmap inferenceservice-config -o jsonpath='{.data.ingress}')"
patch="$(python3 -c 'import json, sys
config = json.loads(sys.argv[1])
config["disableIstioVirtualHost"] = True
config["ingressDomain"] = sys.argv[2]
print(json.dumps({"data": {"ingress": json.dumps(config, indent=2)}}))' "${ingress}" "${INGRESS_DOMAIN}")"
kubectl -n kserve patch configmap inferenceservice-config --type merge -p "${patch}"
kubectl -n kserve rollout restart deployment/kserve-controller-manager
kubectl -n kserve rollout status deployment/kserve-controller-manager --timeout=10m

say "KServe ClusterServingRuntimes (kserve-torchserve among them)"
for attempt in 1 2 3 4 5; do
  if kubectl apply --server-side --force-conflicts -f "${KSERVE_RELEASE}/kserve-cluster-resources.yaml"; then
    break
  fi
  [[ "${attempt}" == 5 ]] && die "KServe's webhook did not accept the ClusterServingRuntimes"
  say "webhook not ready yet; retrying in 10 s"
  sleep 10
done

say "stack ready: cert-manager ${CERT_MANAGER_VERSION}, Knative ${KNATIVE_SERVING_VERSION} + Kourier, KServe ${KSERVE_VERSION}"
