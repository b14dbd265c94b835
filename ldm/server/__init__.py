"""Serving: an AUTOMATIC1111-compatible HTTP API and a web page, one model worker behind a bounded queue.

    HTTP request -> app (routes, errors, auth) -> jobs.plan_request (checked, 422 at once)
        -> worker queue (FIFO, bounded: 503 when full) -> jobs.run_plan on the model -> PNGs + A1111 info

`tools/serve.py` starts it; `a1111.py` holds A1111's names, `models.py` the checkpoints offered.
"""
