# One image for every service; the container's command picks one: `uns run SERVICE`.
FROM python:3.11-slim
WORKDIR /opt/uns
COPY libs/ libs/
COPY services/ services/
COPY uns-schema/ uns-schema/
COPY models/ models/
COPY keys/models.pub keys/models.pub
# Every package: each directory under libs/ and services/ with a pyproject.toml (the
# Makefile's one list), so a new service is in the image with no edit here.
RUN pip install --no-cache-dir $(dirname ./libs/*/pyproject.toml ./services/*/pyproject.toml) \
 && useradd --system --uid 10001 uns
ENV UNS_CONFIG=/opt/uns/uns-schema/plant.yaml
USER uns
ENTRYPOINT ["uns"]
CMD ["--help"]
