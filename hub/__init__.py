"""streamhub: a realtime messaging hub on Redis Streams."""

__version__ = "0.1.0"
