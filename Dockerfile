# One image for every service of docker-compose.yml: the migration job, the API and the GPU
# workers run the same code, so a deployment can never mix versions between them.
#
# torch comes from PyPI at the version pyproject.toml pins; on linux/amd64 that wheel is the
# CUDA build (its CUDA runtime arrives as nvidia-* wheels), so the image needs no CUDA base:
# the host only provides the driver, through the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, read from pyproject.toml alone: this multi-GB layer (torch) is rebuilt
# only when the dependency list changes, not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself. Editable, so service/migrate.py finds alembic.ini and migrations/ beside
# the code in /app, where `alembic upgrade head` (the migrate service) also runs.
COPY . .
RUN pip install --no-deps -e . \
    && useradd --uid 10001 --create-home --home-dir /home/sharp sharp \
    && mkdir -p /data/artifacts /data/uploads /data/hf \
    && chown -R sharp /data

USER sharp

# Defaults for a container; docker-compose.yml sets the database and Redis.
ENV SHARP_ARTIFACT_ROOT=/data/artifacts \
    SHARP_UPLOAD_ROOT=/data/uploads \
    HF_HOME=/data/hf

EXPOSE 8000

CMD ["python", "-m", "uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "8000"]
