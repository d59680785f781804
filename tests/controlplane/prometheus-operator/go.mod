// Pins the prometheus-operator release whose CRDs (ServiceMonitor, PodMonitor,
// PrometheusRule) the tests install to validate manifests/monitoring against.
// Nothing is built: the tests read example/prometheus-operator-crd/ from the
// module cache (go mod download).
module phabmesh.io/prometheus-operator

go 1.26.0

require github.com/prometheus-operator/prometheus-operator v0.85.0
