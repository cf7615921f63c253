"""``clip-worker serve``: query-time embeddings from the worker's own model, through an OpenAI-compatible API.

- :mod:`.api`: the request and response shapes (OpenAI's embeddings API, infinity's ``modality`` for images)
  and the errors in OpenAI's error shape;
- :mod:`.limits`: what one request may carry;
- :mod:`.images`: a request's image strings to encoded bytes or references;
- :mod:`.engine`: the bounded queue, the worker's input handlers, size-or-deadline batching and the worker's
  inference stage;
- :mod:`.metrics`: what the API reports next to the worker's model and GPU metrics;
- :mod:`.app`: the routes (Starlette); :mod:`.server`: start-up, the HTTP server (uvicorn) and the drain.
"""
