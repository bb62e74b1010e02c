# The demo workloads of the examples and tests (examples/apps/, stdlib-only Python).
# Built by composemesh/engine/images.py FROM the same base as the mesh image, no network.
ARG BASE=composemesh-base:bookworm
FROM ${BASE}
COPY apps/ /app/
RUN python3 -m compileall -q /app >/dev/null
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["python3", "/app/demo.py"]
