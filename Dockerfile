# syntax=docker/dockerfile:1
#
# llm-sidecar container image.
#
#   docker build -t llm-sidecar:0.1.0 .
#   docker run --rm -p 8080:8080 -e SIDECAR_UPSTREAM__BASE_URL=... llm-sidecar:0.1.0
#
# Needs BuildKit (the default builder since Docker 23): the runtime stage
# bind-mounts the builder's wheelhouse instead of copying it into a layer.
# Pin the base by digest for reproducible builds with
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>
# Both stages use the same base so the compiled hnswlib wheel matches the
# runtime's Python and glibc exactly.
# .ci/image-build-steps runs these same pip steps without a container engine
# (tests/test_dockerfile.py); keep the two in step.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------
# builder: wheels for llm-sidecar and every dependency (hnswlib compiles here).
FROM ${PYTHON_IMAGE} AS builder

# Unpinned on purpose: the compiler must match the base image's Debian release,
# which the pinned base tag already fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

# hnswlib compiles with -march=native unless HNSWLIB_NO_NATIVE is set: a wheel
# built on an AVX-512 build host would then die of SIGILL on an older node.
# Its extension also carries ~8 MB of debug info that nothing here uses.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HNSWLIB_NO_NATIVE=1 \
    LDFLAGS=-Wl,--strip-debug

WORKDIR /src

# Optional extras, comma-separated: EXTRAS=verifier bakes in the semantic
# cache's verifier model (all-MiniLM-L6-v2, about 90 MB; cache.semantic_verifier).
ARG EXTRAS=""

# Dependencies first, from pyproject.toml alone: this layer (and its slow
# hnswlib compile) is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import os,sys,tomllib; p=tomllib.load(open('pyproject.toml','rb'))['project']; x=[e for e in os.environ.get('EXTRAS','').split(',') if e]; sys.stdout.write('\n'.join(p['dependencies']+[d for e in x for d in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
 && pip wheel --no-cache-dir --wheel-dir /wheels -r /tmp/requirements.txt

# Then the project itself. Its wheel carries the static embedding model
# (proxy/cache/data/minilm-static, package data) and the Redis Lua scripts
# (lua/*.lua, data-files installed to <prefix>/share/llm-sidecar/lua).
COPY README.md ./
COPY lua/ lua/
COPY proxy/ proxy/
COPY loadtest/ loadtest/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------
# runtime: the base image plus those wheels; no compiler, no source tree.
FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG EXTRAS=""
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llm-sidecar" \
      org.opencontainers.image.description="Transparent OpenAI-compatible sidecar proxy: distributed rate limits, response cache, cost routing, OpenTelemetry." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/llm-sidecar/llm-sidecar" \
      org.opencontainers.image.base.name="docker.io/library/${PYTHON_IMAGE}"

# Read-only root filesystem: nothing may write outside /tmp at run time, so
# no bytecode is written (it is compiled below, at build time) and HOME is /tmp.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

# Only the wheelhouse: no index, and no source distribution (nothing could
# compile one). pip byte-compiles what it installs; the base image ships its
# standard library without bytecode, and compiling it here saves every start
# (and every health check) from recompiling it in memory. Unpinned name: with
# --no-index the wheelhouse holds exactly the versions the builder resolved.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --only-binary=:all: --find-links=/wheels \
        --root-user-action=ignore "llm-sidecar${EXTRAS:+[$EXTRAS]}" \
 && python -m compileall -q -j 0 \
        -x '/(test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip|pydoc_data)/' \
        /usr/local/lib/python3.11 \
 && llm-sidecar version

RUN groupadd --gid 10001 sidecar \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin sidecar

# Numeric, so a pod's runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8080

# Docker's own probe (Kubernetes uses its httpGet probes instead). The slim
# image has no curl, so Python's urllib asks /healthz on the health port if
# one is set (SIDECAR_SERVER__HEALTH_PORT), else on the proxy port
# (SIDECAR_SERVER__PORT, default 8080); a port given only as --port is not
# visible here. No proxy: an HTTP_PROXY meant for the upstream must not
# catch a loopback probe. -P keeps the working directory off sys.path.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-P", "-c", "import os, urllib.request as u; port = os.environ.get('SIDECAR_SERVER__HEALTH_PORT') or os.environ.get('SIDECAR_SERVER__PORT') or '8080'; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# Python runs as PID 1 without an init: the sidecar installs its own SIGTERM
# and SIGINT handlers (proxy/server.py), drains in-flight requests for up to
# server.shutdown_timeout_s (15 s) and exits 0, and it starts no child
# processes, so there are no zombies to reap. Give `docker stop` a longer
# grace than its 10 s default (-t 20) so long requests can finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-sidecar"]
CMD ["serve", "--host", "0.0.0.0"]
