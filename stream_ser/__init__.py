"""stream_ser: real-time speech emotion recognition (DCNN-BLSTMwA, Zhang et al. 2021)."""

__version__ = "0.1.0"
