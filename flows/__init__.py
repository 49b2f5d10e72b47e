"""Prefect flows of latentbatch: thin wrappers that call the library and leave artifacts.

Put as little logic as possible here: parameters, calls into ``latentbatch``, artifacts.
"""
