# One image for every negcase worker; compose.yaml picks the command.
FROM python:3.11-slim

# The CPU build of torch: the default wheel on PyPI carries CUDA (gigabytes).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY store ./store
COPY workers ./workers
RUN pip install --no-cache-dir .

# Workers run as an unprivileged user that owns only the archive folder. The folder exists
# (owned by it) before the VOLUME line, so a fresh named volume starts with that owner.
RUN useradd --system --uid 10001 --create-home --home-dir /home/negcase negcase \
    && mkdir -p /data/negative && chown negcase:negcase /data/negative
USER negcase

ENV NEGCASE_DATA_DIR=/data/negative PYTHONUNBUFFERED=1
VOLUME /data/negative
ENTRYPOINT ["negcase"]
CMD ["--help"]
