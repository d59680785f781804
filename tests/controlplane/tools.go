//go:build tools

// Package controlplane pins the Kubernetes commands that phabmesh's test
// harness builds: kube-apiserver, kube-controller-manager, kube-scheduler
// and kubectl.
package controlplane

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
