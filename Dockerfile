# mcp-authz-gateway: a slim, non-root image that runs with a read-only root filesystem.
#   docker build -t mcp-authz-gateway .
#   docker run --read-only --tmpfs /tmp -p 8080:8080 -v $PWD/gateway.yaml:/etc/mcp-authz-gateway/gateway.yaml:ro mcp-authz-gateway
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
COPY profiles ./profiles
COPY examples ./examples
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home gateway
# caches (the WebAssembly module, Rego test verdicts) go to /tmp: the root filesystem is read-only
ENV XDG_CACHE_HOME=/tmp/cache PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["mcp-authz-gateway", "serve"]
CMD ["--config", "/etc/mcp-authz-gateway/gateway.yaml"]
