//go:build tools

// Package etcd pins etcd, the local control plane's store. A 3.6 etcd reports watch
// progress, which the API server needs to serve consistent lists from its watch cache and
// to stream a watch list, as it does on a current cluster. Only the version pinned here is
// built.
package etcd

import (
	_ "go.etcd.io/etcd/server/v3"
)
