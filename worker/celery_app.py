"""The worker's Celery application: ``celery -A worker.celery_app worker`` (what ``python -m
worker`` runs) finds `app` here. Its configuration is the core's (`service.dispatch.make_celery`,
shared with every sender); this module adds the worker's task module and reads the settings
from ``SHARP_*`` variables.
"""

from __future__ import annotations

from service.dispatch import make_celery
from service.settings import get_settings

app = make_celery(get_settings(), include=["worker.tasks"])
