"""dsbench: what each DeepSeek architecture choice buys, measured on your hardware."""
__version__ = "0.1.0"
