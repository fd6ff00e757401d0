"""Serving: the multitask model as composable Ray Serve deployments behind HTTP (see app.py)."""
