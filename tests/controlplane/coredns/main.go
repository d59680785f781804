// Builds CoreDNS for the local control plane's cluster DNS, with only the plugins its
// Corefile uses (phabmesh.dev.clusterdns), plus bind for running it as a host process on
// one address. Each blank import registers one plugin; the order in which a server runs
// them is dnsserver.Directives, CoreDNS's own list, so leaving plugins out changes nothing
// for the ones kept, and a Corefile naming a plugin left out does not load. No plugin
// forwards: the server has no upstream.
package main

import (
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
