"""The model-zoo test's exporter (`export.py`), run in its own virtual environment.

`export.py` imports torch, timm, torchvision and keras, which the service and its `.venv` never
install: `tests/test_model_zoo.py` runs it as a subprocess with the zoo venv's python.
"""
