"""``simvg serve``: a web page and a JSON API (FastAPI + uvicorn; ``pip install 'simvg[serve]'``)."""
