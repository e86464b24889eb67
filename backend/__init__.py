"""livetrain: a Label Studio ML backend that trains an object detector while people annotate."""

__version__ = "0.1.0"
