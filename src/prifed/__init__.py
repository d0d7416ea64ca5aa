"""PriFed: privacy-preserving federated learning for health AI."""

import logging

__version__ = "0.1.0"

# The library sets no handlers: the command line or the caller configures them.
logging.getLogger("prifed").addHandler(logging.NullHandler())
