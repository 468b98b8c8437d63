"""Serving: the SSE/HTTP gateway (gateway), per-view streams (views), access control (access)
and the dashboard's static files."""
