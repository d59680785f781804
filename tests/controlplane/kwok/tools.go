//go:build tools

// Package kwok pins KWOK, the controller that simulates nodes for phabmesh's
// local control plane: it moves pods on its fake nodes through their phases as
// a kubelet would. Only the version pinned here is built.
package kwok

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
