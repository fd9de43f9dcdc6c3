"""edgetl: on-device transfer learning, from a server model to a personalised head on the device."""

__version__ = "0.1.0"
