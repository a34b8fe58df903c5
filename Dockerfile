# syntax=docker/dockerfile:1
# Build: docker build -t cosigner .
# Run:   docker run -p 8080:8080 -v cosigner-data:/data -v ./rules:/app/rules:ro \
#          -e COSIGNER_ADMIN_TOKEN=... -e COSIGNER_STRIPE_KEY=... cosigner
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin cosigner \
 && mkdir -p /data /app/rules && chown cosigner /data
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/* && rm -rf /wheels
COPY rules /app/rules
WORKDIR /app
ENV COSIGNER_LISTEN=0.0.0.0:8080 \
    COSIGNER_DATABASE=sqlite:////data/cosigner.db \
    COSIGNER_RULES=/app/rules \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
USER cosigner
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["cosigner"]
CMD ["serve"]
