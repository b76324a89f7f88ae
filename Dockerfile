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

ENV NEGCASE_DATA_DIR=/data/negative PYTHONUNBUFFERED=1
VOLUME /data/negative
ENTRYPOINT ["negcase"]
CMD ["--help"]
