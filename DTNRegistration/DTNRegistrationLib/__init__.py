"""DTNRegistration engine: Dual Transformer Network registration of brain MRI, without Slicer."""

__version__ = "0.1.0"
