"""Where each request goes: the scheduler interface, its registry and the policies."""
