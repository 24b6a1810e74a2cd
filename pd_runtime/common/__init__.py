"""Pieces shared by several processes: registries, HTTP proxying, logging set-up."""
