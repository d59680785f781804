# syntax=docker/dockerfile:1
# phabmesh: one image for the operator (`phabmesh controller`), the gateway
# (`phabmesh gateway`) and the credential agent the webhook adds to pods (`phabmesh agent`,
# which needs the image's `test` and `sh` for its probe and hook), built from this
# repository's wheel and the pinned dependency set in constraints.txt. Build with BuildKit:
# `docker build -t phabmesh .`

FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY operator ./operator
# The wheel of phabmesh and of every dependency, at the versions constraints.txt pins.
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

FROM python:3.11.14-slim-bookworm
# A fixed non-root user; the Deployments run as the same uid with a read-only root.
RUN groupadd --gid 65532 phabmesh \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin phabmesh
# Only the wheels, mounted for this step: they never become a layer of the image.
# DL3013 (pin pip versions): --no-index installs from /wheels alone, which holds exactly one
# phabmesh wheel and the versions constraints.txt pinned; repeating the version here would
# only be a second place to bump it.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels phabmesh
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER 65532:65532
# 8443 credential endpoint, 8080 Conduit gateway, 9090 metrics and health.
EXPOSE 8443 8080 9090
ENTRYPOINT ["phabmesh"]
# The manifests pass `controller --peering` (several replicas) or `gateway`.
CMD ["controller"]
