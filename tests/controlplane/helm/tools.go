//go:build tools

// Package helm pins Helm, which the chart tests run (helm lint, helm template)
// against phabmesh's chart in charts/phabmesh. Only the version pinned here is built.
package helm

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
