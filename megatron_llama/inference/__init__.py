"""Generation with a key/value cache over our own model classes, and the OpenAI-compatible chat server.

    kv_cache.py    the preallocated key/value cache and the masked attention over it
    sampling.py    greedy, temperature, top-k, top-p from a seeded generator
    generator.py   prefill + incremental decoding of a batch of prompts; stop at end of document / stop strings
    cuda_graph.py  the decode step captured as a CUDA graph (GPU only)
    loading.py     a model for inference from our checkpoint (any saved layout) or a Hugging Face folder
    serving.py     one request at a time on every tensor rank: rank 0 takes requests, the others follow
    openai_api.py  the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, the web page

Command lines: tools/generate.py and tools/chat_server.py.
"""
