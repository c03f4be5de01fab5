"""i2v: frozen image backbones -> video recognisers at a fraction of the training memory."""

__version__ = "0.1.0"
