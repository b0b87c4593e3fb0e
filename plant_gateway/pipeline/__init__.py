"""The request path's shared plumbing: the step protocol, the guard registry, the request adapter.

Nothing here imports a guard except ``registry``, which lists them; guards import only this.
"""
