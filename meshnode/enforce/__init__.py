"""Enforcement: render the signed policy into this node's host firewall and keep the kernel in sync."""
