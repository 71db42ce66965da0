"""The built-in models: trained ones shipped as folders here, and the builder of the others."""

from pathlib import Path

# Trained models that ship inside the package, one folder per name.
PACKAGED_MODELS = Path(__file__).resolve().parent
