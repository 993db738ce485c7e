"""Tenants and the queue of lookups in front of the kernels (tenants, scheduler)."""
