# One image for every service; the container's command picks one: `uns run SERVICE`.
FROM python:3.11-slim
WORKDIR /opt/uns
COPY libs/ libs/
COPY services/ services/
COPY uns-schema/ uns-schema/
COPY models/ models/
COPY keys/models.pub keys/models.pub
RUN pip install --no-cache-dir ./libs/uns ./services/broker ./services/demo \
    ./services/simulator ./services/opcua-adapter ./services/modbus-adapter ./services/replay \
    ./services/featurizer ./services/inference ./services/bridge \
 && useradd --system --uid 10001 uns
ENV UNS_CONFIG=/opt/uns/uns-schema/plant.yaml
USER uns
ENTRYPOINT ["uns"]
CMD ["--help"]
