# One image for every service; the container's command picks one: `uns run SERVICE`.
# docker-compose.yml runs it: as uid 10001 (uns), the code root-owned and not writable by
# it; what a service writes lives on the volumes mounted at /var/lib/uns (the bridge's
# journal; the inference's audit log and open events) and /opt/uns/models (promotions).
FROM python:3.11-slim
WORKDIR /opt/uns
COPY libs/ libs/
COPY services/ services/
COPY uns-schema/ uns-schema/
COPY --chown=10001:10001 models/ models/
COPY keys/models.pub keys/models.pub
# The container's health: /metrics answers and uns_connected is 1 (compose `healthcheck`).
COPY deploy/healthcheck.py deploy/healthcheck.py
# Every package: each directory under libs/ and services/ with a pyproject.toml (the
# Makefile's one list), so a new service is in the image with no edit here.
RUN pip install --no-cache-dir $(dirname ./libs/*/pyproject.toml ./services/*/pyproject.toml) \
 && useradd --system --uid 10001 --home-dir /var/lib/uns uns \
 && install -d -o uns -g uns -m 0750 /var/lib/uns
ENV UNS_CONFIG=/opt/uns/uns-schema/plant.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER uns
ENTRYPOINT ["uns"]
CMD ["--help"]
