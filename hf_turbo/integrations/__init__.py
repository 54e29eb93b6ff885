"""The drop-ins over transformers' own entry points: the accelerated ``generate()`` (``generate.py``, one call
on the engine in ``generate_run.py``, the caches it returns and continues in ``generate_cache.py``) and the
text-generation pipeline's batching (``pipeline.py``)."""
