//go:build tools

// Package prometheus pins promtool, which the tests run to check phabmesh's
// alerting rules (promtool check rules) and to unit-test them (promtool test
// rules). Only the version pinned here is built.
package prometheus

import (
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
