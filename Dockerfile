FROM python:3.11-slim
WORKDIR /app
# CUDA build of torch from the default index on GPU hosts; pin it first so the project's range reuses it.
RUN pip install --no-cache-dir "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY server server
COPY worker worker
COPY pruning pruning
COPY migrations migrations
COPY examples examples
RUN pip install --no-cache-dir .
# Workers run uploaded task bundles as this user (README: "Bring your own code", security model): it owns only
# PRUNEHUB_HOME (artifacts, bundle cache, scratch), never the installed code. Named volumes mounted there start
# with this ownership.
RUN useradd --system --uid 10001 --home-dir /var/lib/prunehub --shell /usr/sbin/nologin prunehub \
    && mkdir -p /var/lib/prunehub/artifacts \
    && chown -R prunehub:prunehub /var/lib/prunehub
USER prunehub
EXPOSE 8000
CMD ["prunehub", "serve", "--host", "0.0.0.0", "--port", "8000"]
