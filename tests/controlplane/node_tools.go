//go:build tools

// The commands of the real node that runs beside the local control plane (beside the KWOK
// nodes): the kubelet and kube-proxy, from the same k8s.io/kubernetes version. Built on
// their own, only when a real node is asked for, into a cache entry of their own.
package controlplane

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
