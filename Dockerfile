# phabmesh: one image for the operator (`phabmesh controller`) and the gateway (`phabmesh gateway`).
# Built from this repository's wheel and the pinned dependency set in constraints.txt.

FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

FROM python:3.11.14-slim-bookworm
# Non-root, no shell needed at run time, nothing written to the image's filesystem.
RUN groupadd --gid 65532 phabmesh \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin phabmesh
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels phabmesh==0.1.0 \
 && rm -rf /wheels
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8443 8080 9090
ENTRYPOINT ["phabmesh"]
CMD ["controller", "--peering"]
