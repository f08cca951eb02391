"""Pydantic models: model configs, request and response envelopes, heatmap payloads."""
