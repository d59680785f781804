#!/bin/sh
# Finish a root filesystem for phabmesh's image, given as $1 (/ inside a Docker build; the
# mmdebstrap tree for `make image`): the fixed non-root user and group 65532 `phabmesh` the
# Deployments run as, and no package lists, caches or logs left behind.
set -eu
root=${1:?usage: finish.sh ROOT}
grep -q '^phabmesh:' "$root/etc/group" \
  || echo 'phabmesh:x:65532:' >>"$root/etc/group"
grep -q '^phabmesh:' "$root/etc/passwd" \
  || echo 'phabmesh:x:65532:65532:phabmesh:/nonexistent:/usr/sbin/nologin' >>"$root/etc/passwd"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/apt "$root"/var/log/dpkg.log "$root"/var/log/alternatives.log \
  "$root"/var/log/bootstrap.log
