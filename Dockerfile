# syntax=docker/dockerfile:1
# Build stage: the same Python minor version (3.13) as the distroless runtime below.
FROM python:3.13-slim-trixie AS build
WORKDIR /src
COPY requirements.txt .
RUN pip install --no-cache-dir --no-compile --only-binary=:all: --target /app/site-packages -r requirements.txt

# Runtime: distroless Python 3.13 (Debian 13), no shell, no pip. Root is needed to create
# the socket in the kubelet's root-owned device-plugins directory; the manifest drops
# every capability and forbids privilege escalation. Distroless publishes no version
# tags, only latest/nonroot/debug: pin a digest (@sha256:...) when you release.
# hadolint ignore=DL3006
FROM gcr.io/distroless/python3-debian13
COPY --from=build /app/site-packages /app/site-packages
COPY nvidia_device_plugin.py device_plugin_pb2.py device_plugin_pb2_grpc.py /app/
ENV PYTHONPATH=/app/site-packages \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility \
    NVIDIA_DISABLE_REQUIRE=true
ENTRYPOINT ["/usr/bin/python3", "/app/nvidia_device_plugin.py"]
