"""The frontend stage: the OpenAI chat API in front of a graph, one file per job.

    openai_api.py  the OpenAI request/response shapes and the one error formatter (streaming and not)
    processor.py   chat template, tokenization and request checks: what a request becomes before any stage works
    router.py      calls to stages (replicas from ../peers.py), with deadlines, and the topology's orchestration
    app.py         the HTTP app (`build_app(settings)`) and the process

    agg    client -> frontend -> pd (loads the images itself, prefills, decodes)
    e-pd   client -> frontend -> encoder -> pd (pulls embeddings over NIXL, prefills, decodes)
    e-p-d  client -> frontend -> encoder -> pd (prefill only, keeps the KV) -> decode (pulls the KV, decodes)

Tokens stream from the last engine to the client through this one hop. Nothing here knows a model family: the
model's chat template renders one placeholder per image, and the engines expand it.
"""

from mmgraph_workers.frontend.app import build_app, main

__all__ = ["build_app", "main"]
