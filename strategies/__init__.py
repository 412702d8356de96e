"""How updates combine: aggregators and federated strategies (see strategies/base.py)."""

from flagstaff.strategies.fedsvd import fedsvd_refactorize

__all__ = ["fedsvd_refactorize"]
