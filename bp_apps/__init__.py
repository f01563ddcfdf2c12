"""bp_apps: backpropagation by hand and with autograd, applied to vision, text and speech."""

__version__ = "0.1.0"
