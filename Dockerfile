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
EXPOSE 8000
CMD ["prunehub", "serve", "--host", "0.0.0.0", "--port", "8000"]
