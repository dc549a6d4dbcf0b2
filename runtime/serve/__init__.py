"""``talkrt serve``: live avatars over WebSocket, every speaking session batched together.

Layers, one way: :mod:`~talkrt.serve.app` (HTTP, WebSocket via :mod:`~talkrt.serve.live`) ->
:mod:`~talkrt.serve.session` (per-connection state) <- :mod:`~talkrt.serve.scheduler` (one
thread per GPU) -> :mod:`~talkrt.serve.renderer` (the pipeline's stages on mixed batches).
The wire protocol is :mod:`~talkrt.serve.protocol` (described for clients in docs/protocol.md).
"""
