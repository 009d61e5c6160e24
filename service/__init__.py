"""The service core: settings, database, models, repositories (all SQL), the job lifecycle,
the scheduler, the artifact and upload stores. Imported by `api`, `worker` and `ops`; imports
only `sharp_core`."""
