"""Model families (registry), width-scalable stacked layers, Split-Mix base sets and costs."""

from models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
