"""Images in and out: decoding and preprocessing uploads (`decode`), rendering maps (`render`).

May import: engines.errors (and schemas). Nothing else of the engines.
"""
