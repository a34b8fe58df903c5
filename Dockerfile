# syntax=docker/dockerfile:1
# Cosigner: the approval gateway in one small image.
#
# Build: docker build -t cosigner .
# Run:   docker run -p 8080:8080 -v cosigner-data:/data -v "$PWD/rules:/app/rules:ro" \
#          -e COSIGNER_SECRET_KEY=... -e COSIGNER_ADMIN_TOKEN=... -e COSIGNER_STRIPE_KEY=... \
#          -e COSIGNER_PUBLIC_URL=https://cosigner.example.com cosigner
# Try the whole flow with PostgreSQL and a mail catcher: docker compose up (compose.yaml).

# -- build: install the package and its dependencies into a virtualenv ---------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/cosigner
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/cosigner/bin/pip install .

# -- runtime: the virtualenv, the default rules, a user without privileges -----------------
FROM python:3.11.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="cosigner" \
      org.opencontainers.image.description="Self-hosted approval gateway for AI agents that call the Stripe API" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 cosigner \
 && useradd --system --uid 10001 --gid cosigner --home-dir /data --shell /usr/sbin/nologin cosigner \
 && mkdir -p /data /app/rules \
 && chown cosigner:cosigner /data
COPY --from=build /opt/cosigner /opt/cosigner
COPY rules /app/rules
WORKDIR /data
ENV PATH=/opt/cosigner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COSIGNER_LISTEN=0.0.0.0:8080 \
    COSIGNER_DATABASE=sqlite:////data/cosigner.db \
    COSIGNER_RULES=/app/rules
# /data: the SQLite database and, if COSIGNER_SECRET_KEY is unset, the generated secret.
# /app/rules: mount your rule files here (read-only is fine); edits are picked up live.
VOLUME ["/data", "/app/rules"]
USER cosigner:cosigner
EXPOSE 8080
# Liveness on /healthz (store reachable, rules loaded), on whatever port COSIGNER_LISTEN names.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('COSIGNER_LISTEN', '0.0.0.0:8080').rpartition(':')[2]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
# SIGTERM (docker stop) finishes in-flight forwards; give it COSIGNER_SHUTDOWN_GRACE (20 s) + margin:
#   docker stop --time 30 ...   (compose: stop_grace_period: 30s)
STOPSIGNAL SIGTERM
ENTRYPOINT ["cosigner"]
CMD ["serve"]
