# syntax=docker/dockerfile:1
# phabmesh: one image for the operator (`phabmesh operator`), the gateway
# (`phabmesh gateway`) and the credential agent the webhook adds to pods (`phabmesh agent`,
# which needs the image's `test` and `sh` for its probe and hook). Build with BuildKit:
# `docker build -t ghcr.io/phabmesh/phabmesh:0.1.0 .`
#
# One recipe with `make image` (phabmesh.dev.image, which builds the same image without Docker
# or a registry): both install the Debian packages in imagerecipe/packages with the dpkg
# excludes in imagerecipe/dpkg-excludes (operator/phabmesh/dev/imagerecipe/), finish the root
# with imagerecipe/finish.sh (user and group 65532
# `phabmesh`, no package lists), and install the Python packages with
# `python -m phabmesh.dev.image python-tree` (this checkout's wheel and the dependencies
# constraints.txt pins, for Debian's python3 3.11). Only the base differs: here the
# debian:bookworm-slim image (BASE: same release; it also has apt), for `make image`
# mmdebstrap's Essential set of bookworm.

ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
# Debian's python3 and pip, only to install the wheels under /out (pip stays in this stage).
# DL3008 (pin apt versions): the release in BASE decides them, as for the runtime stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY operator ./operator
RUN mkdir /out && PYTHONPATH=operator python3 -m phabmesh.dev.image python-tree /out

FROM ${BASE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The recipe files are mounted for this step only: they never become a layer of the image.
RUN --mount=type=bind,source=operator/phabmesh/dev/imagerecipe,target=/image \
    cp /image/dpkg-excludes /etc/dpkg/dpkg.cfg.d/phabmesh \
 && apt-get update \
 && sed -e 's/#.*//' /image/packages | xargs apt-get install -y --no-install-recommends \
 && /image/finish.sh / \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 8443 credential endpoint, 8080 Conduit gateway, 9090 metrics and health.
EXPOSE 8443 8080 9090
ENTRYPOINT ["phabmesh"]
# The manifests pass `operator --peering` (several replicas) or `gateway`.
CMD ["operator"]
