"""Transports that carry round messages: in-process now, HTTPS for deployment."""
