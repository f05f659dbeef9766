"""latentray: compare the latent features of universal machine-learning interatomic
potentials at training-set scale, with Ray. ``latentray.open(OUTPUT)`` reads a run's outputs
(:mod:`latentray.reader`)."""

__version__ = "0.1.0"


def open(output):  # noqa: A001 - the reader's name, as in ``latentray.open(OUTPUT)``
    """The outputs of a run under ``output`` (a path or a pyarrow URI):
    :class:`latentray.reader.Run`."""
    from .reader import Run

    return Run(output)
