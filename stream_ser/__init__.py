"""stream_ser: real-time speech emotion recognition (DCNN-BLSTMwA, Zhang et al. 2021).

    import stream_ser
    model = stream_ser.load_model()            # bundled model, or load_model("model.pt", device="cuda")
    result = model.recognize("speech.wav")     # .label, .confidence, .probabilities, .windows
    stream = model.stream(sample_rate=16000)   # stream.push(chunk) -> rolling windows

Nothing heavy is imported until ``load_model`` is called.
"""

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]


def load_model(path=None, device: str = "cpu"):
    """The bundled model (``path=None``) or a checkpoint; see :mod:`stream_ser.api`."""
    from .api import load_model as _load
    return _load(path, device)
