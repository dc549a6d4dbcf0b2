"""``talkrt serve``: live avatars over WebSocket and offline dubbing jobs, every speaking session
and every job batched together on one set of engines.

Layers, one way: :mod:`~talkrt.serve.app` (HTTP, WebSocket via :mod:`~talkrt.serve.live`) ->
:mod:`~talkrt.serve.session` (per-connection state) <- :mod:`~talkrt.serve.scheduler` (one
thread per GPU) -> :mod:`~talkrt.serve.renderer` (the pipeline's stages on mixed batches).
The wire protocol is :mod:`~talkrt.serve.protocol` (described for clients in docs/protocol.md).

Jobs (docs/jobs.md): :mod:`~talkrt.serve.job_routes` (HTTP) -> :mod:`~talkrt.serve.jobs` (the
service: submissions, quota, retention) -> :mod:`~talkrt.serve.job_store` (SQLite queue),
:mod:`~talkrt.serve.job_files` (uploads, inputs, results) and :mod:`~talkrt.serve.job_runner`
(workers running ``run_pipeline``), whose model stages hand their rows to the scheduler through
:mod:`~talkrt.serve.jobwork`. :mod:`~talkrt.serve.client` and :mod:`~talkrt.serve.submit` are
``talkrt submit``; :mod:`~talkrt.serve.auth` the optional API key.
"""
